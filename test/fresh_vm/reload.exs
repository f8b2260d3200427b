# Run by test/drab/presence/reload_test.exs in a VM of its own, since a bad
# NIF reload can take the whole VM down. Reloads Drab.Presence.Native while a
# table is in use, one way per run:
#
#   elixir reload.exs purge_load          (:code.purge + :code.load_file) twice
#   elixir reload.exs delete_purge_load   :code.delete + :code.purge + :code.load_file
#
# After purge_load the old code stays current, the reload is refused, and the
# running Drab.Presence must still track, list and send diffs: prints
# "reload: ok". delete_purge_load removes the code itself, which no NIF can
# survive (rustler has no upgrade callback, and a second library instance
# could not reach the running table): the new load must be refused, with the
# clear message, and the module left unloaded rather than half working:
# prints "reload: refused". Exits 1 on a failure.

# This run is about reloading, not about a VM that never made the :metas
# atom (test/fresh_vm/list.exs covers that): make it here.
_ = :metas

defmodule Reload do
  def fail(message) do
    IO.puts("FAIL: " <> message)
    System.halt(1)
  end

  def attempt(what, fun) do
    fun.()
  catch
    kind, reason -> fail("#{what}: " <> Exception.format(kind, reason, __STACKTRACE__))
  end

  def owner, do: spawn(fn -> Process.sleep(:infinity) end)

  def await_join(topic, key) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: %{joins: %{^key => _}}} -> :ok
      %{event: "presence_diff", topic: ^topic} -> await_join(topic, key)
    after
      2_000 -> fail("no presence_diff with #{key}'s join within 2 s")
    end
  end
end

spawn(fn ->
  Process.sleep(40_000)
  IO.puts("FAIL: timed out")
  System.halt(1)
end)

# A purge may kill the dispatcher: report what breaks, not the supervisor's exit.
Process.flag(:trap_exit, true)
native = Drab.Presence.Native
topic = "reload"
{:ok, _} = Drab.Presence.start_link(diff_window: 10)
:ok = Drab.Presence.subscribe(topic)
before = Reload.owner()
{:ok, _} = Drab.Presence.track(before, topic, "before", %{n: 1})
Reload.await_join(topic, "before")

reloaded =
  case System.argv() do
    ["purge_load"] ->
      # Twice: the second purge removes the code (and library) loaded first.
      for _ <- 1..2 do
        purged = :code.purge(native)
        {:purge, purged, :load_file, :code.load_file(native)}
      end

    ["delete_purge_load"] ->
      deleted = :code.delete(native)
      purged = :code.purge(native)
      {:delete, deleted, :purge, purged, :load_file, :code.load_file(native)}
  end

IO.puts("reload: #{inspect(reloaded)}; loaded now: #{inspect(:code.is_loaded(native))}")

if System.argv() == ["delete_purge_load"] do
  unless match?({:delete, true, :purge, _, :load_file, {:error, :on_load_failure}}, reloaded) and
           :code.is_loaded(native) == false,
         do: Reload.fail("a NIF load after delete + purge was not refused")

  IO.puts("reload: refused")
  System.halt(0)
end

{:ok, _} =
  Reload.attempt("track after the reload", fn ->
    Drab.Presence.track(Reload.owner(), topic, "after", %{n: 2})
  end)

listed = Reload.attempt("list/1 after the reload", fn -> Drab.Presence.list(topic) end)

unless Map.keys(listed) == ["after", "before"],
  do: Reload.fail("list/1 after the reload gave #{inspect(listed)}")

Reload.await_join(topic, "after")
Process.exit(before, :kill)

receive do
  %{event: "presence_diff", topic: ^topic, payload: %{leaves: %{"before" => _}}} -> :ok
after
  2_000 -> Reload.fail("no presence_diff with the leave of an owner that exited")
end

IO.puts("reload: ok")
System.halt(0)
