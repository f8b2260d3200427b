//! The sidecar binary: `{:packet, 4}` frames on stdin and stdout, logs on
//! stderr (stdout is the protocol), exit when stdin closes.

use std::process::ExitCode;

use presence_core::heap::CountingAllocator;
use presence_sidecar::{pipe, server};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!(
            "presence_sidecar {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            presence_sidecar::protocol::VERSION
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presence_sidecar: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The pipes register with the runtime's reactor: create them inside it.
    let served = runtime.block_on(async { server::run(pipe::stdin(), pipe::stdout()).await });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence_sidecar: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
