# Run by test/drab/presence/fresh_vm_test.exs in a VM of its own (see
# list.exs for why this file must not spell out the atom a listing keys its
# meta lists by). An application's tree, `children = [Drab.Presence]` on the
# defaults: presences come and go for a second while the dispatcher sends
# their diffs; the tree, the dispatcher and the diffs must all be there after.
#
# Exits 0 and prints "fresh VM: ok" on success, 1 on a failure, 2 when the
# atom already existed.

defmodule FreshVM.AppTree do
  def atom_exists? do
    _ = :erlang.binary_to_existing_atom("me" <> "tas", :utf8)
    true
  rescue
    ArgumentError -> false
  end

  def owner, do: spawn(fn -> Process.sleep(:infinity) end)

  def collect(topic, acc) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: %{joins: joins}} ->
        collect(topic, Map.merge(acc, joins))
    after
      0 -> acc
    end
  end
end

spawn(fn ->
  Process.sleep(40_000)
  IO.puts("FAIL: timed out")
  System.halt(1)
end)

if FreshVM.AppTree.atom_exists?() do
  IO.puts("PRECONDITION: the atom exists before drab_presence is loaded; this run proves nothing")
  System.halt(2)
end

Process.flag(:trap_exit, true)
{:ok, tree} = Supervisor.start_link([Drab.Presence], strategy: :one_for_one)
topic = "fresh:app"
:ok = Drab.Presence.subscribe(topic)
dispatcher = Process.whereis(Drab.Presence.Dispatcher)

# Five windows apart: each one a dispatch, as in an app where browsers
# connect one by one.
for i <- 1..5 do
  {:ok, _} = Drab.Presence.track(FreshVM.AppTree.owner(), topic, "user-#{i}", %{i: i})
  Process.sleep(150)
end

Process.sleep(300)

problems =
  [
    {Process.alive?(tree), "the application's supervisor died"},
    {Process.whereis(Drab.Presence.Dispatcher) == dispatcher,
     "the dispatcher restarted (#{inspect(dispatcher)} -> " <>
       "#{inspect(Process.whereis(Drab.Presence.Dispatcher))})"},
    {Map.keys(FreshVM.AppTree.collect(topic, %{})) == Enum.map(1..5, &"user-#{&1}"),
     "not every join arrived as a presence_diff"}
  ]
  |> Enum.reject(&elem(&1, 0))
  |> Enum.map(&elem(&1, 1))

receive do
  {:EXIT, ^tree, reason} -> IO.puts("the tree exited: #{inspect(reason)}")
after
  0 -> :ok
end

case problems do
  [] ->
    IO.puts("fresh VM: ok")
    System.halt(0)

  _ ->
    IO.puts("FAIL: " <> Enum.join(problems, "; "))
    System.halt(1)
end
