# What `diff_window: 0` (Phoenix's diffs, one per operation) costs against
# the default window (50 ms, coalesced), in one run on one machine:
#
#   mix run bench/window.exs [operations]      (default 20000)
#
# Four workers track, update and untrack on 10 topics; one subscriber per
# topic counts the presence_diffs it receives. Reported per window: the
# callers' time per operation, diffs received, and how long after the last
# operation the last diff arrived.

operations = String.to_integer(List.first(System.argv()) || "20000")
topics = for i <- 1..10, do: "bench:window:#{i}"

defmodule Bench.Window do
  def run(module, topics, operations) do
    parent = self()

    counters =
      for topic <- topics do
        spawn_link(fn ->
          :ok = module.subscribe(topic)
          send(parent, :subscribed)
          count(0, nil)
        end)
      end

    for _ <- counters, do: receive(do: (:subscribed -> :ok))
    per_worker = div(operations, 4)
    started = System.monotonic_time(:microsecond)

    workers =
      for w <- 1..4 do
        Task.async(fn ->
          pid = spawn(fn -> Process.sleep(:infinity) end)

          for i <- 1..per_worker do
            topic = Enum.at(topics, rem(i, length(topics)))
            key = "w#{w}-#{rem(i, 50)}"

            case rem(i, 3) do
              0 -> module.track(pid, topic, key, %{i: i})
              1 -> module.update(pid, topic, key, %{i: i})
              2 -> module.untrack(pid, topic, key)
            end
          end

          pid
        end)
      end

    owners = Enum.map(workers, &Task.await(&1, :infinity))
    done = System.monotonic_time(:microsecond)
    Process.sleep(500)

    {diffs, last} =
      Enum.reduce(counters, {0, done}, fn counter, {diffs, last} ->
        send(counter, {:report, self()})
        receive do: ({:count, n, at} -> {diffs + n, max(last, at || done)})
      end)

    Enum.each(owners ++ counters, &Process.exit(&1, :kill))
    ops = per_worker * 4
    %{us_per_op: (done - started) / ops, diffs: diffs, last_diff_ms: (last - done) / 1000}
  end

  defp count(n, at) do
    receive do
      %{event: "presence_diff"} -> count(n + 1, System.monotonic_time(:microsecond))
      {:report, from} -> send(from, {:count, n, at})
    end
  end
end

defmodule Bench.Window.Exact do
  use Drab.Presence, otp_app: :drab_presence, diff_window: 0
end

defmodule Bench.Window.Coalesced do
  use Drab.Presence, otp_app: :drab_presence
end

IO.puts("#{operations} operations (track/update/untrack) by 4 workers on #{length(topics)} topics")

IO.write(
  :io_lib.format("~-22ts ~12ts ~12ts ~22ts~n", [
    "diff_window",
    "µs per op",
    "diffs",
    "last diff after, ms"
  ])
)

for {label, module} <- [
      {"0 (Phoenix's diffs)", Bench.Window.Exact},
      {"50 (default)", Bench.Window.Coalesced}
    ] do
  {:ok, _} = module.start_link([])
  r = Bench.Window.run(module, topics, operations)

  IO.write(
    :io_lib.format("~-22ts ~12.2f ~12B ~22.1f~n", [label, r.us_per_op, r.diffs, r.last_diff_ms])
  )
end
