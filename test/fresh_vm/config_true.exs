# Run by test/drab/presence/setup_test.exs in a VM of its own: the first
# line of Drab's docs, `config :drab, :presence, true`, set before the
# :drab_presence application starts (as config/runtime.exs sets it), must be
# what Drab 0.10 can read once the application is up: a keyword list that
# keys presences by browser id, with an info log saying so.
#
# Exits 0 and prints "fresh VM: ok" on success, 1 on a failure.

Application.put_env(:drab, :presence, true)
{:ok, _} = Application.ensure_all_started(:drab_presence)
Logger.flush()

case Application.get_env(:drab, :presence) do
  [id: []] ->
    IO.puts("fresh VM: ok")
    System.halt(0)

  other ->
    IO.puts("FAIL: config :drab, :presence is #{inspect(other)} after the application started")
    System.halt(1)
end
