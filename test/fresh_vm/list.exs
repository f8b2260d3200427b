# Run by test/drab/presence/fresh_vm_test.exs in a VM of its own, with only
# drab_presence's ebin on top of Elixir: a VM in which no module has made the
# atom a listing keys its meta lists by. The NIF must make it itself, since
# binary_to_term with ERL_NIF_BIN2TERM_SAFE refuses to create atoms. So this
# file must never spell that atom out: it is built from its halves below.
#
# Exits 0 and prints "fresh VM: ok" when list/1, get_by_key/2 (small and
# dirty-scheduler topics) and diff delivery all work; 1 on a failure; 2 when
# the atom already existed, which would make the run prove nothing.

defmodule FreshVM do
  @atom_name "me" <> "tas"

  def atom_exists? do
    _ = :erlang.binary_to_existing_atom(@atom_name, :utf8)
    true
  rescue
    ArgumentError -> false
  end

  def fail(message) do
    IO.puts("FAIL: " <> message)
    System.halt(1)
  end

  def check(true, _message), do: :ok
  def check(_, message), do: fail(message)

  # Calls fun, turning any exception, throw or exit into a failure naming `what`.
  def attempt(what, fun) do
    fun.()
  catch
    kind, reason -> fail("#{what}: " <> Exception.format(kind, reason, __STACKTRACE__))
  end

  # The meta list of a listed entry, under the atom this file must not spell.
  def entry_list(entry) do
    field = String.to_existing_atom(@atom_name)
    check(is_map(entry) and map_size(entry) == 1, "a listed entry is #{inspect(entry)}")
    Map.fetch!(entry, field)
  end

  def owner, do: spawn(fn -> Process.sleep(:infinity) end)

  # Collects diffs of `topic` until `done?` holds for the joins seen so far.
  def joins_until(topic, done?, seen \\ %{}) do
    if done?.(seen) do
      seen
    else
      receive do
        %{event: "presence_diff", topic: ^topic, payload: %{joins: joins}} ->
          joins_until(topic, done?, Map.merge(seen, joins))
      after
        2_000 -> fail("no presence_diff on #{topic} within 2 s; joins so far: #{inspect(seen)}")
      end
    end
  end
end

spawn(fn ->
  Process.sleep(40_000)
  IO.puts("FAIL: timed out")
  System.halt(1)
end)

if FreshVM.atom_exists?() do
  IO.puts("PRECONDITION: the atom exists before drab_presence is loaded; this run proves nothing")
  System.halt(2)
end

{:ok, _supervisor} = Drab.Presence.start_link(diff_window: 10)
small = "fresh:small"
large = "fresh:large"
:ok = Drab.Presence.subscribe(small)
dispatcher = Process.whereis(Drab.Presence.Dispatcher)

alice1 = FreshVM.owner()
{:ok, _} = Drab.Presence.track(alice1, small, "alice", %{n: 1})
{:ok, _} = Drab.Presence.track(FreshVM.owner(), small, "alice", %{n: 2})
bob = FreshVM.owner()
{:ok, _} = Drab.Presence.track(bob, small, "bob", %{n: 3})

# Over the inline limit: listed on a dirty scheduler.
large_owner = FreshVM.owner()
for i <- 1..1_500, do: {:ok, _} = Drab.Presence.track(large_owner, large, "k#{i}", %{i: i})

IO.puts("atom made by loading and tracking: #{FreshVM.atom_exists?()}")

listed = FreshVM.attempt("list/1 of a small topic", fn -> Drab.Presence.list(small) end)
FreshVM.check(Map.keys(listed) == ["alice", "bob"], "list/1 gave #{inspect(listed)}")
alice_list = FreshVM.entry_list(listed["alice"])

FreshVM.check(
  alice_list |> Enum.map(& &1.n) |> Enum.sort() == [1, 2] and
    Enum.all?(alice_list, &is_binary(&1.phx_ref)),
  "alice's meta list is #{inspect(alice_list)}"
)

by_key = FreshVM.attempt("get_by_key/2", fn -> Drab.Presence.get_by_key(small, "bob") end)
FreshVM.check(match?([%{n: 3}], FreshVM.entry_list(by_key)), "get_by_key/2 gave #{inspect(by_key)}")
FreshVM.check(Drab.Presence.get_by_key(small, "nobody") == [], "get_by_key/2 of nobody is not []")

listed_large = FreshVM.attempt("list/1 of a large topic", fn -> Drab.Presence.list(large) end)

FreshVM.check(
  map_size(listed_large) == 1_500,
  "list/1 of #{large} has #{map_size(listed_large)} keys"
)

FreshVM.joins_until(small, &(Map.keys(&1) == ["alice", "bob"]))
Drab.Presence.untrack(bob, small, "bob")

receive do
  %{event: "presence_diff", topic: ^small, payload: %{leaves: %{"bob" => _}}} -> :ok
after
  2_000 -> FreshVM.fail("no presence_diff with bob's leave within 2 s")
end

FreshVM.check(
  Process.whereis(Drab.Presence.Dispatcher) == dispatcher and Process.alive?(dispatcher),
  "the dispatcher restarted while delivering diffs"
)

IO.puts("fresh VM: ok")
System.halt(0)
