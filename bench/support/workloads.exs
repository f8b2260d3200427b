defmodule Bench.Shape do
  @moduledoc false
  # A workload's size: `n` presences spread evenly over `topics` topics.
  defstruct [:label, :n, topics: 1]
end

defmodule Bench.Population do
  @moduledoc false
  # The processes of one run: `n` live processes (one per presence, as a
  # channel process is), what each is tracked as, and a subscriber to every
  # topic. Topics are fresh for every run.
  alias Bench.{Harness, Shape, Subscriber}

  defstruct [:shape, :herd, :topics, :entries, :subscriber]

  def new(adapter, %Shape{n: n, topics: t} = shape) do
    run = System.unique_integer([:positive])
    # Short, as per-user topics are ("user:42"); unique to the run.
    topics = for i <- 0..(t - 1), do: "bench:#{run}:#{i}"
    by_index = List.to_tuple(topics)
    {_herd, pids} = herd = Harness.spawn_herd(n)

    entries =
      pids
      |> Enum.with_index()
      |> Enum.map(fn {pid, i} -> {pid, elem(by_index, rem(i, t)), "user:#{i}"} end)

    %__MODULE__{
      shape: shape,
      herd: herd,
      topics: topics,
      entries: entries,
      subscriber: Subscriber.start(adapter, topics)
    }
  end

  @doc "Ends the run: its processes exit, and the system settles back to no presence."
  def teardown(%__MODULE__{} = pop, adapter) do
    Subscriber.stop(pop.subscriber)
    Harness.kill_herd(pop.herd)
    adapter.quiesce()
    Harness.wait_until(fn -> adapter.presences() == 0 end, "presences to be gone", 120_000, 5)
    adapter.quiesce()
  end
end

defmodule Bench.ChurnWorker do
  @moduledoc false
  # One worker of the churn workload, with its slice of the owner pool:
  # live processes, each with one key on one topic, tracked or not. Set up,
  # it tracks two owners in three (the churn's steady state). Churning, it
  # picks owners at random until the deadline: an untracked one is tracked,
  # a tracked one untracked or updated (even odds), so tracks, untracks and
  # updates come a third each. Every meta it writes carries the time of its
  # operation (`t`); every ref it removes is noted with the time of removal.

  @meta %{online_at: 1_700_000_000}

  def start(adapter, owners) do
    parent = self()
    :erlang.spawn_opt(fn -> init(adapter, List.to_tuple(owners), parent) end, [:monitor])
  end

  defp init(adapter, owners, parent) do
    Process.put(:bench_role, "churn worker")

    refs =
      for i <- 0..(tuple_size(owners) - 1), rem(i, 3) != 0, into: %{} do
        {pid, topic, key} = elem(owners, i)
        {:ok, ref} = adapter.track(pid, topic, key, meta(nil))
        {i, ref}
      end

    send(parent, {:set_up, self()})

    receive do
      {:go, deadline} ->
        {refs, removed, ops} = churn(adapter, owners, deadline, refs, [], {0, 0, 0})
        ended_at = System.monotonic_time()
        {tracks, untracks, updates} = ops

        tracked = Enum.frequencies_by(refs, fn {i, _ref} -> owners |> elem(i) |> elem(1) end)

        send(parent, {
          :churned,
          self(),
          %{
            tracks: tracks,
            untracks: untracks,
            updates: updates,
            removed: removed,
            tracked: tracked,
            ended_at: ended_at
          }
        })
    end
  end

  defp churn(adapter, owners, deadline, refs, removed, {tracks, untracks, updates} = ops) do
    t = System.monotonic_time()

    if t >= deadline do
      {refs, removed, ops}
    else
      i = :rand.uniform(tuple_size(owners)) - 1
      {pid, topic, key} = elem(owners, i)

      case refs do
        %{^i => ref} ->
          if :rand.uniform(2) == 1 do
            :ok = adapter.untrack(pid, topic, key)
            ops = {tracks, untracks + 1, updates}
            churn(adapter, owners, deadline, Map.delete(refs, i), [{ref, t} | removed], ops)
          else
            {:ok, new_ref} = adapter.update(pid, topic, key, meta(t))
            ops = {tracks, untracks, updates + 1}
            churn(adapter, owners, deadline, %{refs | i => new_ref}, [{ref, t} | removed], ops)
          end

        _ ->
          {:ok, new_ref} = adapter.track(pid, topic, key, meta(t))
          ops = {tracks + 1, untracks, updates}
          churn(adapter, owners, deadline, Map.put(refs, i, new_ref), removed, ops)
      end
    end
  end

  defp meta(t), do: Map.put(@meta, :t, t)
end

defmodule Bench.Workloads do
  @moduledoc false
  # One function per workload of the issue. Each takes an adapter, runs on
  # fresh topics and fresh processes, checks the outcome (so that a broken
  # run cannot report a fast time) and returns its figures as a map.
  import Bench.Harness
  alias Bench.{ChurnSubscriber, ChurnWorker, Latency, Population, Shape, StormMember}
  alias Bench.{Subscriber, View}

  @callers 4
  @meta %{online_at: 1_700_000_000}
  @diff_timeout 600_000
  @storm_sample 100

  @doc "How many caller processes drive the calls."
  def callers, do: @callers

  @doc """
  Workloads 1, 2, 4, 5 and 7 on one population per run: track (timed; on
  the last run, with the memory it took if `memory: true` and a ticker if
  `ticker: true`), reads (last run), untrack (timed). Track and untrack are
  the median of `runs`.
  """
  def lifecycle(adapter, %Shape{} = shape, opts) do
    runs = Keyword.fetch!(opts, :runs)
    ticker? = Keyword.get(opts, :ticker, false)
    memory? = Keyword.get(opts, :memory, false)

    results =
      for run <- 1..runs do
        last? = run == runs
        pop = Population.new(adapter, shape)

        try do
          tracked = track(adapter, pop, memory: memory? and last?, ticker: ticker? and last?)
          reads = if last?, do: reads(adapter, pop, ticker: ticker?), else: %{}
          untracked = untrack(adapter, pop)
          tracked |> Map.merge(reads) |> Map.merge(untracked)
        after
          Population.teardown(pop, adapter)
        end
      end

    medians =
      for key <- [:track_us, :track_diff_ms, :untrack_us, :untrack_diff_ms], into: %{} do
        {key, median(Enum.map(results, & &1[key]))}
      end

    Map.merge(List.last(results), medians)
  end

  @doc """
  1. Track: every presence tracked from #{@callers} callers. µs per track
  until every call has returned; ms until the subscriber has the last join.
  5. Memory (with `memory: true`): the rise in `:erlang.memory(:total)`
  after a GC of every process, and in the NIF's heap, per presence. The
  tracked processes exist before the baseline, so they are not counted
  (what tracking adds to them, a monitor or a link, is); neither are the
  coordinator and the subscriber.
  7. With `ticker: true`, the lateness of a 1 ms ticker during the track,
  and the longest stalls (see `Bench.Harness.start_watch/0`).
  """
  def track(adapter, %Population{} = pop, opts) do
    n = pop.shape.n
    memory? = Keyword.get(opts, :memory, false)

    harness = [self(), pop.subscriber]

    {memory0, native0} =
      if memory? do
        adapter.quiesce()
        {gc_memory(harness), adapter.native_bytes()}
      else
        {0, 0}
      end

    callers =
      prepare_callers(pop.entries, @callers, fn {pid, topic, key} ->
        {:ok, _} = adapter.track(pid, topic, key, @meta)
      end)

    watch = if opts[:ticker], do: start_watch()
    reductions0 = total_reductions()
    t0 = now()
    wall_us = run_callers(callers)
    health = watch && stop_watch(watch)
    {view, diff_us} = Subscriber.await(pop.subscriber, n, t0, @diff_timeout)
    adapter.quiesce()
    reductions = total_reductions() - reductions0

    expect_counts!(adapter, pop, div(n, pop.shape.topics))

    # Before anything lists: a listed topic may keep a copy of its listing
    # (ours, from 128 presences), counted on its own below.
    memory =
      if memory? do
        beam = (gc_memory(harness) - memory0) / n

        case adapter.native_bytes() do
          nil ->
            %{memory_beam_b: beam, memory_b: beam}

          native1 ->
            %{
              memory_beam_b: beam,
              memory_nif_b: (native1 - native0) / n,
              memory_b: beam + (native1 - native0) / n
            }
        end
      else
        %{}
      end

    before_lists = memory? && {gc_memory(harness), adapter.native_bytes() || 0}
    expected = isolated("checker", fn -> View.of_lists(adapter, pop.topics) end)
    check!(expected.count == n, "list/1 holds #{expected.count} presences, expected #{n}")
    check!(View.same?(view, expected), "the subscriber's view differs from list/1 after track")

    # A kept listing is a term in a process-independent environment: BEAM
    # memory, outside any process.
    memory =
      case before_lists do
        {beam0, native0} ->
          kept = gc_memory(harness) - beam0 + (adapter.native_bytes() || 0) - native0
          Map.put(memory, :memory_kept_listing_b, kept / n)

        false ->
          memory
      end

    %{
      track_us: wall_us / n,
      track_diff_ms: diff_us / 1_000,
      track_reductions: reductions / n,
      track_diffs: view.diffs
    }
    |> Map.merge(memory)
    |> put_health(:track, health)
  end

  @doc """
  4. Reads on a tracked population: list/1, count_users/1 and
  count_connections/1 of its first topic, median µs per call.
  7. With `ticker: true`, the lateness of a 1 ms ticker meanwhile, and the
  longest stalls.
  """
  def reads(adapter, %Population{} = pop, opts) do
    [topic | _] = pop.topics
    per_topic = div(pop.shape.n, pop.shape.topics)
    watch = if opts[:ticker], do: start_watch()
    on_topic = for {_, ^topic, _} = entry <- pop.entries, do: entry
    updated = on_topic |> Enum.take(100) |> List.to_tuple()

    {list_us, update_list_us, users_us, connections_us} =
      isolated("reader", fn ->
        {
          sample(fn -> adapter.list(topic) end,
            what: "list/1",
            check: &(map_size(&1) == per_topic)
          ),
          # A topic that changes between lists, as a busy one does: one
          # update (of one of 100 presences, in turn), then list/1.
          sample(
            fn ->
              i = Process.get(:bench_update, 0)
              Process.put(:bench_update, i + 1)
              {pid, ^topic, key} = elem(updated, rem(i, tuple_size(updated)))
              {:ok, _} = adapter.update(pid, topic, key, Map.put(@meta, :v, i))
              adapter.list(topic)
            end,
            what: "update + list/1",
            check: &(map_size(&1) == per_topic)
          ),
          sample(fn -> adapter.count_users(topic) end,
            what: "count_users/1",
            check: &(&1 == per_topic)
          ),
          sample(fn -> adapter.count_connections(topic) end,
            what: "count_connections/1",
            check: &(&1 == per_topic)
          )
        }
      end)

    health = watch && stop_watch(watch)

    %{
      list_us: list_us,
      update_list_us: update_list_us,
      count_users_us: users_us,
      count_connections_us: connections_us
    }
    |> put_health(:reads, health)
  end

  @doc """
  2. Untrack: every presence untracked from #{@callers} callers. µs per
  untrack; ms until the subscriber has the last leave.
  """
  def untrack(adapter, %Population{} = pop) do
    n = pop.shape.n
    t0 = now()

    wall_us =
      run_callers(pop.entries, @callers, fn {pid, topic, key} ->
        :ok = adapter.untrack(pid, topic, key)
      end)

    {view, diff_us} = Subscriber.await(pop.subscriber, 0, t0, @diff_timeout)
    check!(view.digest == 0, "the subscriber's view is not empty after untrack")
    expect_counts!(adapter, pop, 0)
    empty? = isolated("checker", fn -> Enum.all?(pop.topics, &(adapter.list(&1) == %{})) end)
    check!(empty?, "list/1 not empty after untrack")

    %{untrack_us: wall_us / n, untrack_diff_ms: diff_us / 1_000}
  end

  @doc """
  7. Concurrent listers: `listers` processes list a topic of `shape.n`
  presences over and over for `ms` milliseconds, as channels joining a
  busy topic each push its presence_state. The ticker's lateness
  meanwhile, the longest stalls, and the lists per second achieved; every
  list is checked for size.
  """
  def concurrent_lists(adapter, %Shape{} = shape, listers, ms) do
    pop = Population.new(adapter, shape)

    try do
      run_callers(pop.entries, @callers, fn {pid, topic, key} ->
        {:ok, _} = adapter.track(pid, topic, key, @meta)
      end)

      Subscriber.await(pop.subscriber, shape.n, now(), @diff_timeout)
      adapter.quiesce()
      [topic] = pop.topics
      n = shape.n
      me = self()
      watch = start_watch()
      deadline = System.monotonic_time(:millisecond) + ms

      for i <- 1..listers do
        spawn_link(fn ->
          Process.put(:bench_role, "lister #{i}")
          send(me, {:listed, list_until(adapter, topic, n, deadline, 0)})
        end)
      end

      lists = Enum.sum(for _ <- 1..listers, do: receive(do: ({:listed, count} -> count)))
      health = stop_watch(watch)

      %{concurrent_lists_per_s: lists * 1_000 / ms}
      |> put_health(:lists, health)
    after
      Population.teardown(pop, adapter)
    end
  end

  defp list_until(adapter, topic, n, deadline, count) do
    if System.monotonic_time(:millisecond) >= deadline do
      count
    else
      listed = adapter.list(topic)
      check!(map_size(listed) == n, "a concurrent list/1 held #{map_size(listed)} keys, not #{n}")
      list_until(adapter, topic, n, deadline, count + 1)
    end
  end

  @doc """
  3. Mass disconnect: all tracked processes exit at once (their herd is
  killed). ms until list/1 of every topic is empty; ms until the subscriber
  has the last leave.
  """
  def mass_disconnect(adapter, %Shape{} = shape) do
    pop = Population.new(adapter, shape)

    try do
      run_callers(pop.entries, @callers, fn {pid, topic, key} ->
        {:ok, _} = adapter.track(pid, topic, key, @meta)
      end)

      Subscriber.await(pop.subscriber, shape.n, now(), @diff_timeout)
      adapter.quiesce()
      {herd, _pids} = pop.herd

      timeouts = :counters.new(1, [])
      deadline = System.monotonic_time(:millisecond) + @diff_timeout

      t0 = now()
      Process.exit(herd, :kill)
      isolated("poller", fn -> await_empty(adapter, pop.topics, timeouts, deadline) end)
      empty_us = since_us(t0)

      {view, diff_us} = Subscriber.await(pop.subscriber, 0, t0, @diff_timeout)
      check!(view.digest == 0, "the subscriber's view is not empty after the disconnect")
      expect_counts!(adapter, pop, 0)

      %{
        disconnect_empty_ms: empty_us / 1_000,
        disconnect_diff_ms: diff_us / 1_000,
        disconnect_list_timeouts: :counters.get(timeouts, 1)
      }
    after
      Population.teardown(pop, adapter)
    end
  end

  # Polls list/1 of the topics not yet seen empty (a topic seen empty stays
  # so: its processes are gone). A list/1 call that exits with a timeout (a
  # GenServer.call behind a busy tracker) is counted, and counts as not empty.
  defp await_empty(_adapter, [], _timeouts, _deadline), do: :ok

  defp await_empty(adapter, topics, timeouts, deadline) do
    if System.monotonic_time(:millisecond) > deadline,
      do: fail!("list/1 was not empty within #{@diff_timeout} ms")

    remaining =
      Enum.reject(topics, fn topic ->
        try do
          adapter.list(topic) == %{}
        catch
          :exit, {:timeout, _} ->
            :counters.add(timeouts, 1, 1)
            false
        end
      end)

    if remaining != [], do: Process.sleep(1)
    await_empty(adapter, remaining, timeouts, deadline)
  end

  @doc """
  6. Join storm: `n` processes subscribe to one topic, then each tracks
  itself. Counts the presence_diff messages delivered to all of them, and
  the ms until every one's view equals list/1: every member counts the
  presences in its view, and one in #{@storm_sample} (at least 10) also keeps
  the digest of their refs, so that the members' own work stays well below
  that of delivering the diffs to them.
  """
  def join_storm(adapter, n, timeout_ms) do
    topic = "bench:storm:#{System.unique_integer([:positive])}"
    me = self()
    every = min(@storm_sample, div(n, 10))

    {_, members} =
      herd =
      spawn_herd(n, fn i ->
        view_opts = [digest?: rem(i, every) == 0]
        StormMember.run(adapter, topic, "user:#{i}", n, me, view_opts)
      end)

    try do
      for _ <- 1..n do
        receive do
          {:subscribed, _} -> :ok
        after
          60_000 -> fail!("storm members did not all subscribe")
        end
      end

      t0 = now()
      Enum.each(members, &send(&1, :go))
      deadline = System.monotonic_time(:millisecond) + timeout_ms
      converged_at = for _ <- 1..n, do: await_converged(deadline, timeout_ms)
      converge_us = System.convert_time_unit(Enum.max(converged_at) - t0, :native, :microsecond)

      expected = View.of_lists(adapter, [topic])
      check!(expected.count == n, "list/1 holds #{expected.count} presences, expected #{n}")
      views = Enum.map(members, &report_view/1)
      check!(Enum.all?(views, &View.same?(&1, expected)), "a storm member's view differs")
      digests = Enum.count(views, & &1.digest?)
      check!(digests >= 10, "only #{digests} storm members kept a digest")

      %{storm_diffs: Enum.sum(Enum.map(views, & &1.diffs)), storm_converge_ms: converge_us / 1_000}
    after
      kill_herd(herd)
      adapter.quiesce()
    end
  end

  defp await_converged(deadline, timeout_ms) do
    receive do
      {:converged, _pid, at} -> at
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        fail!("not every storm member's view converged within #{timeout_ms} ms")
    end
  end

  defp report_view(pid) do
    send(pid, {:report, self()})

    receive do
      {:view, ^pid, view} -> view
    after
      60_000 -> fail!("storm member did not report")
    end
  end

  @doc """
  8. Diff latency under churn: `workers` processes track, untrack and
  update at random, as fast as they can for `seconds`, over a pool of
  `owners` live processes per topic on `topics` topics (two in three
  tracked), with one subscriber per topic. For every change a diff brings,
  the time from the operation to the subscriber's receipt of that diff:
  p50, p99 and max over all changes delivered (a change undone within one
  diff window is never delivered, so not counted). Also the operations per
  second achieved, the diffs each topic received per second during the
  churn and the gaps between them, and how long the last diffs took to go
  out once the churn stopped. The subscribers' views are checked against
  list/1 at the end.
  """
  def churn(adapter, opts) do
    topic_count = Keyword.fetch!(opts, :topics)
    per_topic = Keyword.fetch!(opts, :owners)
    worker_count = Keyword.fetch!(opts, :workers)
    seconds = Keyword.fetch!(opts, :seconds)

    run = System.unique_integer([:positive])
    topics = for i <- 0..(topic_count - 1), do: "bench:churn:#{run}:#{i}"
    by_index = List.to_tuple(topics)
    n = topic_count * per_topic
    {_, pids} = herd = spawn_herd(n)

    owners =
      pids
      |> Enum.with_index()
      |> Enum.map(fn {pid, i} -> {pid, elem(by_index, rem(i, topic_count)), "user:#{i}"} end)

    histogram = Latency.new()
    subscribers = Enum.map(topics, &ChurnSubscriber.start(adapter, &1, histogram))

    workers =
      owners
      |> Enum.chunk_every(div(n + worker_count - 1, worker_count))
      |> Enum.map(&ChurnWorker.start(adapter, &1))

    try do
      Enum.each(workers, fn {pid, ref} -> await_worker(pid, ref, :set_up) end)
      adapter.quiesce()

      t0 = now()
      deadline = t0 + System.convert_time_unit(seconds * 1_000, :millisecond, :native)
      Enum.each(workers, fn {pid, _} -> send(pid, {:go, deadline}) end)
      results = Enum.map(workers, fn {pid, ref} -> await_worker(pid, ref, :churned) end)
      t_end = results |> Enum.map(& &1.ended_at) |> Enum.max()
      adapter.quiesce()

      tracked = Enum.reduce(results, %{}, &Map.merge(&2, &1.tracked, fn _, a, b -> a + b end))

      reports =
        isolated("checker", fn ->
          for {topic, subscriber} <- Enum.zip(topics, subscribers) do
            expected = Map.get(tracked, topic, 0)
            connections = adapter.count_connections(topic)

            check!(
              connections == expected,
              "#{topic}: #{connections} presences, expected #{expected}"
            )

            ChurnSubscriber.report(subscriber, View.of_lists(adapter, [topic]), @diff_timeout)
          end
        end)

      ops = Enum.sum(for r <- results, do: r.tracks + r.untracks + r.updates)
      leave_max_us = measure_leaves(results, reports, histogram)
      churn_us = System.convert_time_unit(t_end - t0, :native, :microsecond)

      arrivals =
        Enum.map(reports, &(&1.arrivals |> Enum.filter(fn at -> at >= t0 end) |> Enum.reverse()))

      last_at = arrivals |> Enum.map(&List.last(&1, t0)) |> Enum.max()
      during = Enum.map(arrivals, fn times -> Enum.filter(times, &(&1 <= t_end)) end)
      gaps = Enum.flat_map(during, &gaps/1)
      to_ms = &(System.convert_time_unit(&1, :native, :microsecond) / 1_000)

      %{
        churn_ops_s: ops / (churn_us / 1_000_000),
        churn_p50_ms: Latency.percentile(histogram, 50) / 1_000,
        churn_p99_ms: Latency.percentile(histogram, 99) / 1_000,
        churn_max_ms: Enum.max([leave_max_us | Enum.map(reports, & &1.max_us)]) / 1_000,
        churn_changes: Latency.count(histogram),
        churn_ops: ops,
        churn_diffs_topic_s:
          Enum.sum(Enum.map(during, &length/1)) / topic_count / (churn_us / 1_000_000),
        churn_interval_ms: if(gaps == [], do: nil, else: to_ms.(Enum.sum(gaps)) / length(gaps)),
        churn_interval_max_ms: if(gaps == [], do: nil, else: to_ms.(Enum.max(gaps))),
        churn_drain_ms: to_ms.(max(last_at - t_end, 0))
      }
    after
      Enum.each(subscribers, &Process.exit(&1, :kill))
      Enum.each(workers, fn {pid, _} -> Process.exit(pid, :kill) end)
      kill_herd(herd)
      adapter.quiesce()
      wait_until(fn -> adapter.presences() == 0 end, "presences to be gone", 120_000, 5)
      adapter.quiesce()
    end
  end

  defp await_worker(pid, ref, tag) do
    receive do
      {^tag, ^pid, result} -> result
      {^tag, ^pid} -> :ok
      {:DOWN, ^ref, :process, ^pid, reason} -> fail!("a churn worker crashed: #{short(reason)}")
    after
      @diff_timeout -> fail!("a churn worker did not finish #{tag}")
    end
  end

  # Leaves are matched with the time their ref was removed. Every leave
  # delivered must be of a ref a worker removed.
  defp measure_leaves(results, reports, histogram) do
    removed_at = results |> Enum.flat_map(& &1.removed) |> Map.new()

    for report <- reports, {ref, at} <- report.leaves, reduce: 0 do
      max_us ->
        t = Map.get(removed_at, ref) || fail!("a leave of #{inspect(ref)}, which no worker removed")
        us = System.convert_time_unit(at - t, :native, :microsecond)
        Latency.add(histogram, us)
        max(us, max_us)
    end
  end

  defp gaps([]), do: []

  defp gaps([first | rest]),
    do:
      rest
      |> Enum.scan({first, 0}, fn at, {prev, _} -> {at, at - prev} end)
      |> Enum.map(&elem(&1, 1))

  # Both counts of every topic must be `per_topic` (every key is a user).
  defp expect_counts!(adapter, pop, per_topic) do
    isolated("checker", fn ->
      for topic <- pop.topics do
        users = adapter.count_users(topic)
        connections = adapter.count_connections(topic)

        check!(
          users == per_topic and connections == per_topic,
          "#{topic}: count_users #{users}, count_connections #{connections}, expected #{per_topic}"
        )
      end
    end)
  end

  defp put_health(map, _phase, nil), do: map

  defp put_health(map, phase, health) do
    Map.merge(map, %{
      :"#{phase}_tick_ms" => health.worst_us / 1_000,
      :"#{phase}_tick_p99_ms" => health.p99_us / 1_000,
      :"#{phase}_stalls" => health.stalls
    })
  end

  defp total_reductions do
    {total, _since_last} = :erlang.statistics(:exact_reductions)
    total
  end
end
