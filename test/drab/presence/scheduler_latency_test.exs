defmodule Drab.Presence.SchedulerLatencyTest do
  # Calls that hold a normal scheduler (or the table lock) for tens
  # of milliseconds. A high-priority ticker wants to run every 1 ms; with one
  # normal scheduler online, a NIF that holds it shows as a gap between
  # ticks. Each bound is checked on the best of three runs, so that one
  # hiccup of a shared machine does not fail the test, while a call that
  # blocks every time does. Not async: changes schedulers_online and
  # measures latencies.
  use Drab.PresenceCase, async: false

  # NIF internals: scheduler holds, reloads, clean VMs on the NIF.
  @moduletag :nif_only

  @moduletag timeout: 180_000

  # Ticks are 1 ms apart: a gap this long means the scheduler was held.
  @max_gap_us 15_000

  setup_all do
    {idle, _} = best_of(3, fn -> worst_tick_gap(fn -> Process.sleep(100) end) end)
    IO.puts("\nticker, idle: worst gap #{idle} µs")
    :ok
  end

  test "list/1 of 1,000 presences with 60 KB metas does not hold a scheduler",
       %{topic: topic} do
    blob = :binary.copy("x", 60_000)
    owners = owners(1_000)

    for {pid, i} <- Enum.with_index(owners),
        do: {:ok, _} = Drab.Presence.track(pid, topic, "u#{i}", %{i: i, blob: blob})

    {gap, listed} = best_of(3, fn -> worst_tick_gap(fn -> Drab.Presence.list(topic) end) end)
    report("list/1, 1,000 × 60 KB", gap)
    assert map_size(listed) == 1_000
    assert gap < @max_gap_us, "list/1 held the scheduler for #{gap} µs"
  end

  test "get_by_key/2 of a key with 100k presences does not hold a scheduler", %{topic: topic} do
    owners = owners(100_000)

    owners
    |> Enum.chunk_every(25_000)
    |> Enum.map(fn chunk ->
      Task.async(fn ->
        for pid <- chunk, do: {:ok, _} = Drab.Presence.track(pid, topic, "hot", %{})
      end)
    end)
    |> Enum.each(&Task.await(&1, 60_000))

    {gap, %{metas: metas}} =
      best_of(3, fn -> worst_tick_gap(fn -> Drab.Presence.get_by_key(topic, "hot") end) end)

    report("get_by_key/2, 100k presences under one key", gap)
    assert length(metas) == 100_000
    assert gap < @max_gap_us, "get_by_key/2 held the scheduler for #{gap} µs"
  end

  describe "an oversized meta is refused without holding a scheduler" do
    setup %{topic: topic} do
      {:ok, _} = Drab.Presence.track(live_pid(), topic, "kept", %{a: 1})
      {:ok, before: Drab.Presence.list(topic)}
    end

    for {name, build} <- [
          # Copying is fast: it takes a few hundred MB to show.
          {"a 300 MB binary", quote(do: %{blob: :binary.copy("x", 300_000_000)})},
          {"a 5M-element list", quote(do: %{list: List.duplicate(0, 5_000_000)})},
          {"a 2M-deep nested list",
           quote(do: %{deep: Enum.reduce(1..2_000_000, [], fn _, acc -> [acc] end)})},
          {"a 2M-deep nested map",
           quote(do: Enum.reduce(1..2_000_000, %{}, fn _, acc -> %{a: acc} end))}
        ] do
      test name, %{topic: topic, before: before} do
        meta = unquote(build)
        pid = live_pid()
        :erlang.garbage_collect()

        {gap, raised} =
          best_of(3, fn ->
            # The garbage of the previous refusal goes first.
            :erlang.garbage_collect()

            worst_tick_gap(fn ->
              try do
                Drab.Presence.track(pid, topic, "big", meta)
              rescue
                exception -> exception
              end
            end)
          end)

        report("track of #{unquote(name)}", gap)
        assert %ArgumentError{message: message} = raised
        assert message =~ "max_meta_bytes"
        assert Drab.Presence.list(topic) == before
        assert gap < @max_gap_us, "refusing #{unquote(name)} held the scheduler for #{gap} µs"
      end
    end
  end

  test "one process with 40k presences: its tracks stay cheap, its exit stalls nobody",
       %{topic: topic} do
    # Best of three exits, as for the ticker: a caller's call can also wait
    # for the OS to give its scheduler a core back, once in a while, on a
    # shared 2-core machine; an exit that holds the table waits every time.
    [{first, last, before_exit, during_exit, hold} | _] =
      for run <- 1..3 do
        one_exit("#{topic}:#{run}")
      end
      |> Enum.sort_by(&elem(&1, 4))

    IO.puts(
      "\none owner, 40k tracks: median #{first} ns for the first 1,000, #{last} ns for the " <>
        "last 1,000; its exit held the table lock #{hold} µs at most; a caller's worst " <>
        "lateness: #{before_exit} µs before the exit, #{during_exit} µs during it (best of 3)"
    )

    # The hold is what other writers wait on, and what a down callback
    # costs its scheduler: measured in the NIF (test-hooks), it carries less
    # of the OS noise a caller's lateness does on a shared 2-core machine,
    # though a preempted holder still shows (1-3 ms here under load). The
    # whole exit in one hold is 38 ms.
    problems =
      [
        {last < 4 * first + 2_000,
         "the 40,000th track costs #{last} ns, the first #{first} ns: " <>
           "a track is O(presences of its owner)"},
        {hold < 10_000, "an owner of 40k presences held the table lock #{hold} µs as it exited"}
      ]
      |> Enum.reject(&elem(&1, 0))
      |> Enum.map_join("; ", &elem(&1, 1))

    assert problems == ""
  end

  defp one_exit(topic) do
    parent = self()
    count = 40_000

    # The owner tracks itself, timing each call: 40 topics of 1,000 keys.
    owner =
      spawn(fn ->
        times =
          for i <- 0..(count - 1) do
            started = System.monotonic_time(:nanosecond)
            {:ok, _} = Drab.Presence.track(self(), "#{topic}:#{rem(i, 40)}", "k#{i}", %{i: i})
            System.monotonic_time(:nanosecond) - started
          end

        send(parent, {:tracked, times})
        Process.sleep(:infinity)
      end)

    assert_receive {:tracked, times}, 60_000
    first = median(Enum.take(times, 1_000))
    last = median(Enum.take(times, -1_000))

    # Another process tracks and untracks meanwhile, every millisecond, and
    # records how late its rounds came: waits on the table lock and on a
    # scheduler held by the exit both show. Like the ticker, it runs at high
    # priority, so that ordinary time-sharing with the dispatcher does not
    # show, and paces itself, so that it does not compete with the exit for
    # the two cores and measure the OS's time slices.
    other = live_pid()

    meanwhile =
      spawn_link(fn ->
        Process.flag(:priority, :high)
        churn(other, topic <> ":other", 0)
      end)

    Process.sleep(50)
    send(meanwhile, {:report, self()})
    assert_receive {:worst_wait_us, before_exit}

    _ = Drab.Presence.Native.test_take_longest_exit_hold_us()
    Process.exit(owner, :kill)
    wait_until(fn -> gone?(topic) end)
    hold = Drab.Presence.Native.test_take_longest_exit_hold_us()
    Process.sleep(20)
    send(meanwhile, {:stop, self()})
    assert_receive {:worst_wait_us, during_exit}
    assert gone?(topic)
    {first, last, before_exit, during_exit, hold}
  end

  defp gone?(topic), do: Enum.all?(0..39, &(Drab.Presence.count_connections("#{topic}:#{&1}") == 0))

  # Tracks and untracks every millisecond; answers with the longest gap
  # between two rounds since the last report, less the millisecond it
  # sleeps: a round that waited on the table lock, or for a scheduler held
  # by the exit, shows as a long gap.
  defp churn(pid, topic, worst, last \\ System.monotonic_time(:microsecond)) do
    {:ok, _} = Drab.Presence.track(pid, topic, "k", %{})
    :ok = Drab.Presence.untrack(pid, topic, "k")
    now = System.monotonic_time(:microsecond)
    worst = max(worst, now - last - 1_000)

    receive do
      {:report, from} ->
        send(from, {:worst_wait_us, worst})
        churn(pid, topic, 0)

      {:stop, from} ->
        send(from, {:worst_wait_us, worst})
    after
      1 -> churn(pid, topic, worst, now)
    end
  end

  defp owners(n) do
    pids = for _ <- 1..n, do: spawn(fn -> Process.sleep(:infinity) end)
    on_exit(fn -> Enum.each(pids, &Process.exit(&1, :kill)) end)
    pids
  end

  defp median(list), do: list |> Enum.sort() |> Enum.at(div(length(list), 2))

  defp report(what, gap), do: IO.puts("\n#{what}: worst tick gap #{gap} µs")
end
