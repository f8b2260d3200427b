//! NIFs for the ExUnit suite only (cargo feature `test-hooks`).

/// Panics, to show that a Rust panic reaches Elixir as an exception and
/// leaves the VM, and the table, running.
#[rustler::nif]
fn test_panic() -> rustler::Atom {
    panic!("deliberate panic from test_panic/0")
}
