defmodule Drab.Presence.SoakPresence do
  @moduledoc false
  # The soak's own presence module: killing and restarting its processes
  # never disturbs Drab.Presence, which the rest of the suite shares.
  use Drab.Presence, otp_app: :drab_presence
end

defmodule Drab.Presence.Soak do
  @moduledoc false
  # Churn against an exact model, with chaos.
  #
  # Workers track, untrack and update (maps and functions, no-ops included)
  # and make owners exit, each on owners of its own, so each knows exactly
  # which presences it holds: the model is the union of the workers' state.
  # Now and then a worker tracks 2,500 presences at once under one owner,
  # and later lets it exit: diffs cut into parts. One subscriber per topic
  # rebuilds the topic from presence_diff broadcasts as phoenix.js does
  # (syncDiff); when the subscriber registry restarts, it re-subscribes and
  # takes list/1 as its new state, as phoenix.js takes presence_state on a
  # rejoin. Listers call list/1 on random topics all along, as channels
  # that join push presence_state: a presence a listing showed must still
  # reach a subscriber that never listed as a join before its leave. Until
  # it resyncs, each subscriber counts the leaves of refs it never had and
  # the joins of refs it had. Meanwhile a chaos process kills the dispatcher
  # (often right as it delivers), kills the registry, and stops and restarts
  # the whole presence supervisor. A call made while it is stopped raises
  # and changes nothing (a stopped module takes no write), so the worker
  # makes it again once the module is back; such calls are counted.
  #
  # At the end: churn stops, the views settle, and counts, list/1 and every
  # subscriber's view must equal the model; then every owner exits, every
  # view must empty, and the NIF heap must come back within @heap_slack of
  # where it was before the soak. `run/1` raises on any mismatch.
  #
  # Used by test/drab/presence/soak_test.exs and scripts/soak.

  alias Drab.Presence.SoakPresence, as: Presence
  alias Drab.PresenceCase

  @defaults [
    seconds: 10,
    topics: 50,
    keys: 30,
    workers: 4,
    listers: 2,
    owners_per_worker: 60,
    # Ops per second per worker: flat out, workers would starve the
    # dispatcher and the subscribers of the two cores CI machines have.
    rate: 5_000,
    diff_window: 10,
    chaos: [:kill_dispatcher, :kill_registry, :restart],
    chaos_every_ms: 20..120,
    mid_delivery: 0.5,
    burst: 2_500,
    burst_every_ms: 1_500,
    progress_every_ms: nil,
    log: &IO.puts/1,
    seed: nil
  ]

  # "Near the baseline" for the NIF heap once everyone has left.
  @heap_slack 2 * 1_048_576

  # Counter indexes.
  @ops 1
  @diffs 2
  @resyncs 3
  @kill_dispatcher 4
  @kill_registry 5
  @restart 6
  @gave_up 7
  @lists 8
  @unknown_leaves 9
  @duplicate_joins 10
  @stopped_calls 11

  @doc """
  Runs the soak; returns what it did. Raises `RuntimeError` on a mismatch.

  Options: `seconds`, `topics`, `keys` (per topic), `workers`, `listers`,
  `owners_per_worker`, `rate` (ops per second per worker, or `:infinity`), `diff_window`, `chaos` (any of `:kill_dispatcher`,
  `:kill_registry`, `:restart`; `[]` for none), `chaos_every_ms` (a range),
  `mid_delivery` (the share of dispatcher kills made right as a diff
  arrives), `burst` (presences of one owner at once, 0 for none),
  `burst_every_ms`, `progress_every_ms`, `log`, `seed`.
  """
  @spec run(keyword()) :: map()
  def run(opts \\ []) do
    opts = Keyword.merge(@defaults, opts)
    seed = opts[:seed] || :erlang.unique_integer([:positive])
    opts = Keyword.put(opts, :seed, seed)
    topics = for i <- 1..opts[:topics], do: "soak:#{i}"
    counters = :counters.new(11, [:write_concurrency])

    stop_presence()
    start_presence(opts)
    # Presences of a previous run's owners may still be on their way out.
    wait!(fn -> Presence.stats().presences == 0 end, "the soak table to be empty")
    baseline = settled_stats()
    parent = self()

    subscribers =
      Map.new(topics, fn topic ->
        {topic, spawn_link(fn -> subscriber(topic, counters, parent) end)}
      end)

    # Subscribed before the churn: their first list/1 is of an empty table.
    for _ <- topics, do: receive(do: ({:subscribed, _} -> :ok))
    chaos = spawn_link(fn -> chaos(opts, topics, counters, parent) end)

    workers =
      for id <- 1..opts[:workers],
          do: spawn_link(fn -> worker(id, opts, topics, counters, parent) end)

    listers =
      for id <- 1..opts[:listers],
          opts[:listers] > 0,
          do: spawn_link(fn -> lister(id, opts, topics, counters) end)

    try do
      started = System.monotonic_time(:millisecond)
      churn_for(opts, counters, started, started)
      ops = :counters.get(counters, @ops)
      elapsed_ms = System.monotonic_time(:millisecond) - started

      call(chaos, :stop)
      Enum.each(listers, &kill_linked/1)
      models = Enum.map(workers, &call(&1, :stop))
      expected = expected_by_topic(models)
      at_end = Presence.stats()

      views = settle(subscribers, counters)
      check!(topics, expected, views, "after the churn")

      for %{owners: owners} <- models, pid <- Map.keys(owners), do: Process.exit(pid, :kill)
      wait!(fn -> Presence.stats().presences == 0 end, "every owner's presences to leave")
      views = settle(subscribers, counters)
      check!(topics, %{}, views, "after every owner left")
      heap = settled_heap!(baseline.nif_heap_bytes)

      %{
        seed: seed,
        seconds: elapsed_ms / 1_000,
        ops: ops,
        ops_per_s: round(ops * 1_000 / max(elapsed_ms, 1)),
        presences_at_end: at_end.presences,
        diffs: :counters.get(counters, @diffs),
        resyncs: :counters.get(counters, @resyncs),
        lists: :counters.get(counters, @lists),
        unknown_leaves: :counters.get(counters, @unknown_leaves),
        duplicate_joins: :counters.get(counters, @duplicate_joins),
        stopped_calls: :counters.get(counters, @stopped_calls),
        chaos: chaos_counts(counters),
        nif_heap_bytes: %{
          baseline: baseline.nif_heap_bytes,
          end: at_end.nif_heap_bytes,
          after: heap
        }
      }
    rescue
      exception in RuntimeError ->
        reraise RuntimeError,
                "soak (seed #{seed}, chaos #{inspect(chaos_counts(counters))}): " <>
                  Exception.message(exception),
                __STACKTRACE__
    after
      # Workers take their linked owners with them.
      for pid <- [chaos | workers] ++ listers ++ Map.values(subscribers), do: kill_linked(pid)
      stop_presence()
    end
  end

  @doc "One line about a finished run, for logs."
  @spec summary(map()) :: String.t()
  def summary(result) do
    "soak ok: seed #{result.seed}, #{result.ops} ops in #{result.seconds} s " <>
      "(#{result.ops_per_s}/s), #{result.presences_at_end} presences at the end, " <>
      "#{result.diffs} diffs, #{result.resyncs} resyncs, #{result.lists} lists, " <>
      "#{result.unknown_leaves} unknown leaves and #{result.duplicate_joins} duplicate joins " <>
      "before a resync, #{result.stopped_calls} calls made again after a stop, " <>
      "chaos #{inspect(result.chaos)}, " <>
      "NIF heap #{mb(result.nif_heap_bytes.baseline)} -> #{mb(result.nif_heap_bytes.end)} " <>
      "-> #{mb(result.nif_heap_bytes.after)}"
  end

  ## The run

  defp churn_for(opts, counters, started, last_report) do
    now = System.monotonic_time(:millisecond)
    every = opts[:progress_every_ms]

    cond do
      now - started >= opts[:seconds] * 1_000 ->
        :ok

      every && now - last_report >= every ->
        ops = :counters.get(counters, @ops)
        secs = (now - started) / 1_000

        opts[:log].(
          "soak #{round(secs)} s: #{ops} ops (#{round(ops / secs)}/s), " <>
            "#{while_started(counters, &Presence.stats/0).presences} presences, " <>
            "#{:counters.get(counters, @diffs)} diffs, " <>
            "#{:counters.get(counters, @resyncs)} resyncs, chaos #{inspect(chaos_counts(counters))}"
        )

        churn_for(opts, counters, started, now)

      true ->
        Process.sleep(50)
        churn_for(opts, counters, started, last_report)
    end
  end

  defp chaos_counts(counters) do
    %{
      dispatcher_kills: :counters.get(counters, @kill_dispatcher),
      registry_kills: :counters.get(counters, @kill_registry),
      restarts: :counters.get(counters, @restart),
      supervisor_gave_up: :counters.get(counters, @gave_up)
    }
  end

  defp kill_linked(pid) do
    Process.unlink(pid)
    Process.exit(pid, :kill)
  end

  defp call(pid, request) do
    ref = Process.monitor(pid)
    send(pid, {request, self(), ref})

    receive do
      {^ref, reply} ->
        Process.demonitor(ref, [:flush])
        reply

      {:DOWN, ^ref, _, _, reason} ->
        raise "#{inspect(pid)} died: #{inspect(reason)}"
    after
      30_000 -> raise "#{inspect(pid)} did not answer #{inspect(request)} within 30 s"
    end
  end

  # A start fails while a killed registry's partition is still on its way
  # out (its name is taken): try again. Only the chaos process, which traps
  # exits, restarts the presence module during the churn.
  defp start_presence(opts, tries \\ 100) do
    case Presence.start_link(diff_window: opts[:diff_window], backend: Drab.PresenceCase.backend()) do
      {:ok, pid} ->
        Process.unlink(pid)
        pid

      {:error, {:already_started, pid}} ->
        pid

      {:error, reason} when tries > 0 ->
        receive do
          {:EXIT, _, ^reason} -> :ok
        after
          0 -> :ok
        end

        Process.sleep(5)
        start_presence(opts, tries - 1)

      {:error, reason} ->
        raise "soak: #{inspect(Presence)} does not start: #{inspect(reason)}"
    end
  end

  defp stop_presence do
    case Process.whereis(Presence) do
      nil -> :ok
      pid -> Supervisor.stop(pid)
    end
  catch
    :exit, _ -> :ok
  end

  defp settled_stats do
    wait!(fn -> Presence.stats().pending_topics == 0 end, "the dispatcher to drain")
    Process.sleep(100)
    Presence.stats()
  end

  defp settled_heap!(baseline) do
    wait!(
      fn -> Presence.stats().nif_heap_bytes <= baseline + @heap_slack end,
      fn ->
        "the NIF heap to come back near its baseline (#{mb(baseline)} + #{mb(@heap_slack)}); " <>
          "it holds #{mb(Presence.stats().nif_heap_bytes)}"
      end,
      3_000
    )

    Presence.stats().nif_heap_bytes
  end

  defp wait!(fun, what, timeout_ms \\ 15_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    wait_loop(fun, what, deadline)
  end

  defp wait_loop(fun, what, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        raise "soak: timed out waiting for " <> if(is_function(what), do: what.(), else: what)

      true ->
        Process.sleep(20)
        wait_loop(fun, what, deadline)
    end
  end

  # Waits until no diff is pending and no subscriber's view has changed for
  # 300 ms, every subscriber on the current registry; returns the views.
  defp settle(subscribers, counters, stable \\ 0, last \\ nil, tries \\ 150) do
    Process.sleep(100)
    pending = Presence.stats().pending_topics
    registry = Process.whereis(Presence.Subscribers)
    reports = Map.new(subscribers, fn {topic, pid} -> {topic, call(pid, :report)} end)
    on_registry? = Enum.all?(reports, fn {_, r} -> r.registry == registry end)
    signature = {:counters.get(counters, @diffs), :counters.get(counters, @resyncs)}
    still? = pending == 0 and on_registry? and signature == last

    cond do
      still? and stable >= 2 ->
        Map.new(reports, fn {topic, r} -> {topic, r.view} end)

      tries == 0 ->
        raise "soak: the views never settled (pending topics #{pending}, subscribers on the " <>
                "current registry: #{on_registry?}, diffs/resyncs #{inspect(signature)})"

      true ->
        settle(subscribers, counters, if(still?, do: stable + 1, else: 0), signature, tries - 1)
    end
  end

  ## Checks

  # %{topic => %{key => sorted metas}} from the workers' owners.
  defp expected_by_topic(models) do
    for %{owners: owners} <- models,
        {_pid, presences} <- owners,
        {{topic, key}, meta} <- presences,
        reduce: %{} do
      acc -> update_in(acc, [Access.key(topic, %{}), Access.key(key, [])], &[meta | &1])
    end
    |> Map.new(fn {topic, keys} ->
      {topic, Map.new(keys, fn {k, metas} -> {k, Enum.sort(metas)} end)}
    end)
  end

  defp check!(topics, expected, views, moment) do
    problems =
      for topic <- topics,
          problem = topic_problem(topic, Map.get(expected, topic, %{}), views[topic]),
          problem != nil,
          do: "#{topic}: #{problem}"

    if problems != [] do
      raise "soak mismatch #{moment}, on #{length(problems)} of #{length(topics)} topics " <>
              "(missing = in the model, not there; extra = there, not in the model):\n  " <>
              Enum.join(Enum.take(problems, 10), "\n  ")
    end
  end

  defp topic_problem(topic, expected, view) do
    listed = Presence.list(topic)
    counts = {Presence.count_users(topic), Presence.count_connections(topic)}

    expected_counts =
      {map_size(expected), expected |> Map.values() |> Enum.map(&length/1) |> Enum.sum()}

    cond do
      counts != expected_counts ->
        "counts #{inspect(counts)}, model #{inspect(expected_counts)}"

      PresenceCase.bare(listed) != expected ->
        "list/1 differs from the model: #{difference(PresenceCase.bare(listed), expected)}"

      PresenceCase.bare(view) != expected ->
        "the subscriber's view differs from the model: " <>
          difference(PresenceCase.bare(view), expected)

      by_ref(view) != by_ref(listed) ->
        "the subscriber's view and list/1 have the same metas under different refs"

      true ->
        nil
    end
  end

  defp by_ref(presences) do
    Map.new(presences, fn {key, %{metas: metas}} -> {key, Enum.sort_by(metas, & &1.phx_ref)} end)
  end

  defp difference(actual, expected) do
    pairs = fn grouped -> for {key, metas} <- grouped, meta <- metas, do: {key, meta} end
    missing = pairs.(expected) -- pairs.(actual)
    extra = pairs.(actual) -- pairs.(expected)

    "#{length(missing)} missing #{inspect(Enum.take(missing, 3))}, " <>
      "#{length(extra)} extra #{inspect(Enum.take(extra, 3))}"
  end

  ## Subscribers

  # Registry.register/3 links the caller to the registry: subscribers trap
  # exits to outlive a registry that restarts, and leave with their parent.
  defp subscriber(topic, counters, parent) do
    Process.flag(:trap_exit, true)
    state = %{topic: topic, view: %{}, registry: nil, monitor: nil, parent: parent, pure?: true}
    state = resync(state, counters)
    send(parent, {:subscribed, topic})
    subscriber_loop(state, counters)
  end

  defp subscriber_loop(%{topic: topic, monitor: monitor, parent: parent} = state, counters) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} ->
        :counters.add(counters, @diffs, 1)
        if state.pure?, do: count_surprises(state.view, payload, counters)
        subscriber_loop(%{state | view: PresenceCase.sync_diff(state.view, payload)}, counters)

      {:DOWN, ^monitor, :process, _, _} ->
        :counters.add(counters, @resyncs, 1)
        subscriber_loop(%{resync(state, counters) | pure?: false}, counters)

      {:report, from, ref} ->
        send(from, {ref, %{view: state.view, registry: state.registry}})
        subscriber_loop(state, counters)

      {:EXIT, ^parent, reason} ->
        exit(reason)

      {:EXIT, _registry_partition, _reason} ->
        subscriber_loop(state, counters)
    end
  end

  # What phoenix.js would get wrong, for a subscriber that took the empty
  # table's list/1 and every diff since: a leave of a ref it never had
  # (shown as someone who never appeared leaving), or a join of a ref it has.
  defp count_surprises(view, %{joins: joins, leaves: leaves}, counters) do
    refs = fn presences -> for {_, %{metas: metas}} <- presences, m <- metas, do: m.phx_ref end
    had = MapSet.new(refs.(view))
    joined = refs.(joins)
    duplicates = Enum.count(joined, &MapSet.member?(had, &1))
    had = MapSet.union(had, MapSet.new(joined))
    unknown = Enum.count(refs.(leaves), &(not MapSet.member?(had, &1)))
    if duplicates > 0, do: :counters.add(counters, @duplicate_joins, duplicates)
    if unknown > 0, do: :counters.add(counters, @unknown_leaves, unknown)
  end

  ## Listers

  # Lists random topics flat out, a channel join's presence_state each; a
  # call made while the chaos process has the module stopped is skipped.
  defp lister(id, opts, topics, counters) do
    :rand.seed(:exsss, {opts[:seed], id, 3})
    topics = List.to_tuple(topics)
    lister_loop(topics, counters)
  end

  defp lister_loop(topics, counters) do
    topic = elem(topics, :rand.uniform(tuple_size(topics)) - 1)

    try do
      Presence.list(topic)
      :counters.add(counters, @lists, 1)
    rescue
      ArgumentError -> Process.sleep(1)
    end

    lister_loop(topics, counters)
  end

  # The registry is gone, so are our subscriptions: wait for its successor,
  # drop the diffs sent before (list/1 covers them), subscribe, and take
  # list/1 as the new state.
  defp resync(%{topic: topic} = state, counters) do
    registry = await_registry(state.registry)
    flush_diffs(topic)
    monitor = Process.monitor(registry)

    # Any of these raises while the module is stopped.
    view =
      try do
        _ = Presence.unsubscribe(topic)
        if Presence.subscribe(topic) == :ok, do: Presence.list(topic)
      rescue
        ArgumentError -> nil
      end

    if view do
      %{state | view: view, registry: registry, monitor: monitor}
    else
      Process.demonitor(monitor, [:flush])
      resync(state, counters)
    end
  end

  defp await_registry(old) do
    case Process.whereis(Presence.Subscribers) do
      pid when is_pid(pid) and pid != old ->
        pid

      _ ->
        Process.sleep(2)
        await_registry(old)
    end
  end

  defp flush_diffs(topic) do
    receive do
      %{event: "presence_diff", topic: ^topic} -> flush_diffs(topic)
    after
      0 -> :ok
    end
  end

  ## Chaos

  defp chaos(opts, topics, counters, parent) do
    :rand.seed(:exsss, {opts[:seed], 0, 1})
    # It subscribes too: see subscriber/3. And a failed start exits it.
    Process.flag(:trap_exit, true)

    state = %{
      opts: opts,
      topics: topics,
      counters: counters,
      parent: parent,
      supervisor: nil,
      registry: nil
    }

    chaos_loop(ensure_started(state))
  end

  defp chaos_loop(%{parent: parent, supervisor: {_, supervisor_ref}} = state) do
    receive do
      {:stop, from, ref} ->
        _ = ensure_started(state)
        send(from, {ref, :ok})

      {:EXIT, ^parent, reason} ->
        exit(reason)

      {:EXIT, _linked, _reason} ->
        chaos_loop(state)

      {:DOWN, ^supervisor_ref, :process, _, _} ->
        # Too many restarts in a row: the supervisor gave up. Start it again.
        :counters.add(state.counters, @gave_up, 1)
        chaos_loop(ensure_started(%{state | supervisor: nil}))
    after
      Enum.random(state.opts[:chaos_every_ms]) ->
        if state.opts[:chaos] == [],
          do: chaos_loop(state),
          else: chaos_loop(chaos_event(state))
    end
  end

  defp chaos_event(state) do
    event = Enum.random(weighted(state.opts[:chaos]))
    state = ensure_started(state)

    case event do
      :kill_dispatcher ->
        # Half the time right as a diff arrives, when the dispatcher is most
        # likely in the middle of a delivery.
        state =
          if :rand.uniform() < state.opts[:mid_delivery], do: await_delivery(state), else: state

        kill(Presence.Dispatcher)
        :counters.add(state.counters, @kill_dispatcher, 1)
        state

      :kill_registry ->
        kill(Presence.Subscribers)
        :counters.add(state.counters, @kill_registry, 1)
        state

      :restart ->
        {pid, ref} = state.supervisor
        Process.demonitor(ref, [:flush])

        try do
          Supervisor.stop(pid)
        catch
          :exit, _ -> :ok
        end

        Process.sleep(:rand.uniform(80))
        :counters.add(state.counters, @restart, 1)
        ensure_started(%{state | supervisor: nil})
    end
  end

  defp weighted(chaos) do
    Enum.flat_map(chaos, fn
      :kill_dispatcher -> List.duplicate(:kill_dispatcher, 7)
      :kill_registry -> List.duplicate(:kill_registry, 2)
      :restart -> List.duplicate(:restart, 2)
    end)
  end

  defp kill(name) do
    case Process.whereis(name) do
      nil -> :ok
      pid -> Process.exit(pid, :kill)
    end
  end

  defp ensure_started(%{supervisor: {pid, _}} = state) do
    if Process.alive?(pid), do: state, else: ensure_started(%{state | supervisor: nil})
  end

  defp ensure_started(state) do
    pid = Process.whereis(Presence) || start_presence(state.opts)
    %{state | supervisor: {pid, Process.monitor(pid)}}
  end

  defp await_delivery(state) do
    registry = Process.whereis(Presence.Subscribers)

    state =
      if registry != state.registry and registry != nil do
        try do
          for topic <- state.topics do
            _ = Presence.unsubscribe(topic)
            :ok = Presence.subscribe(topic)
          end
        rescue
          ArgumentError -> :ok
        end

        %{state | registry: registry}
      else
        state
      end

    flush_all_diffs()

    receive do
      %{event: "presence_diff"} -> :ok
    after
      200 -> :ok
    end

    state
  end

  defp flush_all_diffs do
    receive do
      %{event: "presence_diff"} -> flush_all_diffs()
    after
      0 -> :ok
    end
  end

  ## Workers

  defp worker(id, opts, topics, counters, parent) do
    :rand.seed(:exsss, {opts[:seed], id, 2})
    pool = for _ <- 1..opts[:owners_per_worker], do: owner()

    state = %{
      id: id,
      topics: List.to_tuple(topics),
      keys: opts[:keys],
      pool: List.to_tuple(pool),
      owners: Map.new(pool, &{&1, %{}}),
      seq: 0,
      counters: counters,
      burst: opts[:burst],
      burst_every_ms: opts[:burst_every_ms],
      next_burst: System.monotonic_time(:millisecond) + :rand.uniform(opts[:burst_every_ms]),
      burst_owner: nil,
      parent: parent,
      rate: opts[:rate],
      started: System.monotonic_time(:millisecond)
    }

    worker_loop(state)
  end

  defp worker_loop(state) do
    receive do
      {:stop, from, ref} ->
        send(from, {ref, %{owners: state.owners}})
        # Its owners are linked to it: they stay until it is killed, and it
        # stays when the soak makes them exit.
        Process.flag(:trap_exit, true)
        stopped(state.parent)
    after
      0 ->
        roll = :rand.uniform(100)

        state =
          if burst_due?(state),
            do: burst(state),
            else: while_started(state.counters, fn -> op(state, roll) end)

        :counters.add(state.counters, @ops, 1)
        pace(state)
        worker_loop(%{state | seq: state.seq + 1})
    end
  end

  # Every 50 ops, sleeps off any lead over the rate.
  defp pace(%{rate: rate, seq: seq} = state) when is_integer(rate) and rem(seq, 50) == 0 do
    due_ms = div(seq * 1_000, rate)
    ahead_ms = due_ms - (System.monotonic_time(:millisecond) - state.started)
    if ahead_ms > 0, do: Process.sleep(ahead_ms)
  end

  defp pace(_state), do: :ok

  defp stopped(parent) do
    receive do
      {:EXIT, ^parent, reason} -> exit(reason)
      {:EXIT, _owner, _reason} -> stopped(parent)
    end
  end

  defp owner do
    spawn_link(fn ->
      receive do
        {:exit, reason} -> exit(reason)
      end
    end)
  end

  defp op(state, roll) when roll <= 35 do
    pid = random_owner(state)
    topic = elem(state.topics, :rand.uniform(tuple_size(state.topics)) - 1)
    key = "k#{:rand.uniform(state.keys)}"
    meta = new_meta(state)

    case {Map.has_key?(state.owners[pid], {topic, key}), Presence.track(pid, topic, key, meta)} do
      {false, {:ok, ref}} when is_binary(ref) ->
        put_presence(state, pid, {topic, key}, meta)

      {true, {:error, {:already_tracked, ^pid, ^topic, ^key}}} ->
        state

      {tracked?, other} ->
        fail!(state, "track of #{inspect({pid, topic, key})} (tracked: #{tracked?})", other)
    end
  end

  defp op(state, roll) when roll <= 50 do
    with_presence(state, fn pid, {topic, key}, _meta ->
      case Presence.untrack(pid, topic, key) do
        :ok -> update_in(state.owners[pid], &Map.delete(&1, {topic, key}))
        other -> fail!(state, "untrack", other)
      end
    end)
  end

  defp op(state, roll) when roll <= 68 do
    with_presence(state, fn pid, {topic, key} = where, _meta ->
      meta = new_meta(state)

      case Presence.update(pid, topic, key, meta) do
        {:ok, ref} when is_binary(ref) -> put_presence(state, pid, where, meta)
        other -> fail!(state, "update with a map", other)
      end
    end)
  end

  defp op(state, roll) when roll <= 84 do
    with_presence(state, fn pid, {topic, key} = where, meta ->
      fun =
        case :rand.uniform(4) do
          1 -> & &1
          _ -> &Map.update(&1, :n, 0, fn n -> n + 1 end)
        end

      case Presence.update(pid, topic, key, fun) do
        {:ok, ref} when is_binary(ref) -> put_presence(state, pid, where, fun.(meta))
        other -> fail!(state, "update with a function", other)
      end
    end)
  end

  defp op(state, roll) when roll <= 90 do
    # The same meta: a no-op that keeps its ref and sends nothing.
    with_presence(state, fn pid, {topic, key}, meta ->
      case Presence.update(pid, topic, key, meta) do
        {:ok, ref} when is_binary(ref) -> state
        other -> fail!(state, "update with the same meta", other)
      end
    end)
  end

  defp op(state, roll) when roll <= 94 do
    pid = random_owner(state)
    topic = elem(state.topics, 0)

    case Presence.untrack(pid, topic, "never-tracked") do
      :ok -> state
      other -> fail!(state, "untrack of nothing", other)
    end
  end

  defp op(state, _roll) do
    index = :rand.uniform(tuple_size(state.pool)) - 1
    pid = elem(state.pool, index)
    exit_owner(pid, Enum.random([:kill, :shutdown, :normal, {:crash, state.seq}]))
    fresh = owner()

    %{
      state
      | pool: put_elem(state.pool, index, fresh),
        owners: state.owners |> Map.delete(pid) |> Map.put(fresh, %{})
    }
  end

  defp burst_due?(%{burst: burst} = state) when burst > 0,
    do: System.monotonic_time(:millisecond) >= state.next_burst

  defp burst_due?(_state), do: false

  # The previous burst owner exits (a mass leave), a new one tracks `burst`
  # presences on one topic (a mass join): both cut into parts.
  defp burst(state) do
    owners =
      case state.burst_owner do
        nil ->
          state.owners

        pid ->
          exit_owner(pid, :kill)
          Map.delete(state.owners, pid)
      end

    pid = owner()
    topic = elem(state.topics, :rand.uniform(tuple_size(state.topics)) - 1)

    presences =
      Map.new(1..state.burst, fn i ->
        meta = %{w: state.id, burst: i}

        {:ok, _} =
          while_started(state.counters, fn -> Presence.track(pid, topic, "b#{i}", meta) end)

        {{topic, "b#{i}"}, meta}
      end)

    %{
      state
      | owners: Map.put(owners, pid, presences),
        burst_owner: pid,
        next_burst: System.monotonic_time(:millisecond) + state.burst_every_ms
    }
  end

  # A call that raised because the chaos had stopped the module changed
  # nothing: it is made again until the module is back.
  defp while_started(counters, call) do
    call.()
  rescue
    error in ArgumentError ->
      if error.message =~ "#{inspect(Presence)} is not started" do
        :counters.add(counters, @stopped_calls, 1)
        Process.sleep(1)
        while_started(counters, call)
      else
        reraise error, __STACKTRACE__
      end
  end

  defp exit_owner(pid, :normal) do
    send(pid, {:exit, :normal})
  end

  defp exit_owner(pid, reason) do
    Process.unlink(pid)
    if reason == :kill, do: Process.exit(pid, :kill), else: send(pid, {:exit, reason})
  end

  defp random_owner(state), do: elem(state.pool, :rand.uniform(tuple_size(state.pool)) - 1)

  defp with_presence(state, fun) do
    pid = random_owner(state)

    case Map.to_list(state.owners[pid]) do
      [] -> op(state, 1)
      presences -> apply_to(fun, pid, Enum.random(presences))
    end
  end

  defp apply_to(fun, pid, {where, meta}), do: fun.(pid, where, meta)

  defp put_presence(state, pid, where, meta), do: put_in(state.owners[pid][where], meta)

  defp new_meta(state) do
    case :rand.uniform(3) do
      1 -> %{w: state.id, n: state.seq}
      2 -> %{w: state.id, n: state.seq, tags: ["t#{:rand.uniform(5)}"]}
      3 -> %{w: state.id, n: state.seq, nested: %{at: state.seq, on: :rand.uniform(2) == 1}}
    end
  end

  defp fail!(state, what, got) do
    raise "soak worker #{state.id}: #{what} returned #{inspect(got)}"
  end

  defp mb(bytes), do: "#{Float.round(bytes / 1_048_576, 1)} MB"
end
