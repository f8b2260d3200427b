defmodule Drab.Presence.JsTraceTest do
  # Drives the real Drab.Presence through scripted and seeded random changes,
  # rebuilds a subscriber's view from the presence_diffs exactly as phoenix.js
  # does, and checks it against list/1 (and list/1 against a model) whenever
  # the system is quiet. The state and every diff are written as a JSON trace
  # that test/js replays through the real phoenix.js Presence client.
  #
  # Not async: quiescence is read from stats/0, whose pending_topics counts
  # every test's topics.
  use Drab.PresenceCase, async: false

  @keys ["alice", "bob", "carol", "dave", "ünïcode 🙂", "42"]
  @pool_size 6
  @random_steps 300

  test "a phoenix.js view built from presence_diffs always equals list/1", %{topic: topic} do
    trace_path = trace_path()
    File.rm(trace_path)
    # The ExUnit seed picks the sequence: `mix test --seed N` replays it.
    :rand.seed(:exsss, {ExUnit.configuration()[:seed], 0, 0})
    :ok = Drab.Presence.subscribe(topic)

    [a, b, c | _] = pids = for _ <- 1..@pool_size, do: live_pid()
    s = %{topic: topic, pids: pids, model: %{}, client: %{}, trace: [], last: []}

    # Listed before their diff goes out: the first diff repeats joins the
    # state already has, as when a channel pushes presence_state on join.
    s = Enum.reduce([{a, "alice"}, {b, "alice"}, {a, "bob"}], s, &track(&2, &1, %{n: 0}))
    state = Drab.Presence.list(topic)
    assert map_size(state) == 2
    s = %{s | client: state, trace: [%{event: "presence_state", payload: state}]}

    s =
      s
      |> step("first diff", [])
      |> step("third meta of a key", [{:track, c, "alice", %{device: "tablet"}}])
      |> step("integer key", [{:track, c, 42, %{n: 1}}])
      |> step("update, map", [{:update, a, "alice", %{n: 1, device: "phone"}}])
      |> step("update, function", [{:update, b, "alice", &Map.update(&1, :n, 0, fn n -> n + 1 end)}])
      |> step("update, unknown", [{:update, c, "bob", %{n: 9}}])

    assert s.last == []
    s = step(s, "update, same map", [{:update, a, "alice", %{n: 1, device: "phone"}}])
    assert s.last == []
    s = step(s, "update, identity function", [{:update, b, "alice", & &1}])
    assert s.last == []
    s = step(s, "already tracked", [{:track, a, "alice", %{n: 5}}])
    assert s.last == []

    s =
      s
      |> step("untrack one of three metas", [{:untrack, b, "alice"}])
      |> step("untrack, not tracked", [{:untrack, b, "dave"}])
      |> step("kill an owner of two keys", [{:kill, a}])
      |> step("updates coalesce", [
        {:update, c, "alice", %{n: 2}},
        {:update, c, "alice", %{n: 3}},
        {:update, c, 42, %{n: 3}}
      ])
      |> step("rejoin under the same key", [{:untrack, c, "alice"}, {:track, c, "alice", %{}}])
      |> step("join and leave cancel out", [{:track, b, "dave", %{}}, {:untrack, b, "dave"}])
      |> step("kill the last owner of keys", [{:kill, c}])

    s = Enum.reduce(1..@random_steps, s, fn i, s -> step(s, "random #{i}", random_ops(s)) end)

    diffs = Enum.count(s.trace, &(&1.event == "presence_diff"))
    assert diffs > @random_steps / 2, "only #{diffs} diffs in #{@random_steps} random steps"

    File.mkdir_p!(Path.dirname(trace_path))
    File.write!(trace_path, :jiffy.encode(Enum.reverse(s.trace), [:use_nil]))
  end

  # Both runners read the same path; give an absolute one, as they run from
  # different directories.
  defp trace_path do
    System.get_env("DRAB_PRESENCE_JS_TRACE") ||
      Path.join(Path.dirname(Mix.Project.build_path()), "js_trace.json")
  end

  defp random_ops(s) do
    case :rand.uniform(12) do
      n when n <= 4 ->
        [random_op(s, :track)]

      n when n <= 6 ->
        [random_op(s, :untrack)]

      n when n <= 8 ->
        [random_op(s, :update)]

      n when n <= 10 ->
        [random_op(s, :update_fun)]

      11 ->
        [{:kill, Enum.random(s.pids)}]

      # Back to back, so that they usually share a diff window.
      12 ->
        for op <- Enum.take_random([:track, :untrack, :update, :update_fun], 3),
            do: random_op(s, op)
    end
  end

  defp random_op(s, :track), do: {:track, Enum.random(s.pids), Enum.random(@keys), random_meta()}

  defp random_op(s, :untrack) do
    {pid, key} = some_presence(s)
    {:untrack, pid, key}
  end

  defp random_op(s, :update) do
    {pid, key} = some_presence(s)
    {:update, pid, key, random_meta()}
  end

  defp random_op(s, :update_fun) do
    {pid, key} = some_presence(s)
    fun = Enum.random([&Map.put(&1, :n, rem(Map.get(&1, :n, 0) + 1, 3)), &Map.delete(&1, :away)])
    {:update, pid, key, fun}
  end

  # Mostly a tracked presence, sometimes any pid and key.
  defp some_presence(s) do
    if s.model != %{} and :rand.uniform(4) > 1,
      do: s.model |> Map.keys() |> Enum.random(),
      else: {Enum.random(s.pids), Enum.random(@keys)}
  end

  # Small domains, so that random updates are sometimes no-ops.
  defp random_meta do
    Enum.random([
      %{n: :rand.uniform(2)},
      %{n: :rand.uniform(2), device: Enum.random(["phone", "laptop"])},
      %{n: 0, away: Enum.random([true, false, nil]), tags: Enum.take_random(["x", "y", "z"], 2)}
    ])
  end

  defp step(s, label, ops) do
    s = Enum.reduce(ops, s, &apply_op(&2, &1))
    await_quiet(s)
    await_fetchers()
    diffs = receive_diffs(s.topic)
    listed = Drab.Presence.list(s.topic)
    assert sorted(listed) == sorted(modelled(s.model)), "list/1 after #{label}"
    client = Enum.reduce(diffs, s.client, &sync_diff(&2, &1))
    assert sorted(client) == sorted(listed), "phoenix.js view after #{label}"

    # Only the last diff of a step has a known list/1: earlier ones (a step
    # straddling a window) are replayed but not checked on their own.
    entries =
      diffs
      |> Enum.map(&%{event: "presence_diff", step: label, payload: &1})
      |> List.update_at(-1, &Map.put(&1, :expected, listed))

    %{s | client: client, trace: Enum.reverse(entries, s.trace), last: diffs}
  end

  defp apply_op(s, {:track, pid, key, meta}), do: track(s, {pid, key}, meta)

  defp apply_op(s, {:untrack, pid, key}) do
    assert Drab.Presence.untrack(pid, s.topic, key) == :ok
    %{s | model: Map.delete(s.model, {pid, to_string(key)})}
  end

  defp apply_op(s, {:update, pid, key, meta_or_fun}) do
    result = Drab.Presence.update(pid, s.topic, key, meta_or_fun)

    case Map.fetch(s.model, {pid, to_string(key)}) do
      :error ->
        assert result == {:error, :nopresence}
        s

      {:ok, %{meta: meta, ref: ref} = entry} ->
        assert {:ok, new_ref} = result
        new_meta = new_meta(meta_or_fun, with_refs(entry))

        if new_meta === meta do
          assert new_ref == ref
          s
        else
          assert new_ref != ref
          entry = %{meta: new_meta, ref: new_ref, prev: ref}
          put_in(s.model[{pid, to_string(key)}], entry)
        end
    end
  end

  defp apply_op(s, {:kill, pid}) do
    Process.exit(pid, :kill)
    model = for {{owner, _key}, _} = entry <- s.model, owner != pid, into: %{}, do: entry
    %{s | model: model, pids: List.delete(s.pids, pid) ++ [live_pid()]}
  end

  defp track(s, {pid, key}, meta) do
    case Drab.Presence.track(pid, s.topic, key, meta) do
      {:ok, ref} ->
        refute Map.has_key?(s.model, {pid, to_string(key)})
        put_in(s.model[{pid, to_string(key)}], %{meta: meta, ref: ref, prev: nil})

      {:error, {:already_tracked, ^pid, _topic, ^key}} ->
        assert Map.has_key?(s.model, {pid, to_string(key)})
        s
    end
  end

  defp new_meta(fun, current) when is_function(fun, 1),
    do: current |> fun.() |> Map.drop([:phx_ref, :phx_ref_prev])

  defp new_meta(meta, _current), do: meta

  defp with_refs(%{meta: meta, ref: ref, prev: nil}), do: Map.put(meta, :phx_ref, ref)

  defp with_refs(%{prev: prev} = entry),
    do: Map.put(with_refs(%{entry | prev: nil}), :phx_ref_prev, prev)

  defp modelled(model) do
    model
    |> Enum.group_by(fn {{_pid, key}, _} -> key end, fn {_, entry} -> with_refs(entry) end)
    |> Map.new(fn {key, metas} -> {key, %{metas: metas}} end)
  end

  # Removals of killed owners happen in the NIF's monitor callback, after
  # Process.exit/2 returns: wait for the count, then for the diffs.
  defp await_quiet(s, tries \\ 500) do
    quiet? =
      Drab.Presence.count_connections(s.topic) == map_size(s.model) and
        Drab.Presence.stats().pending_topics == 0

    cond do
      quiet? ->
        :ok

      tries == 0 ->
        flunk("Drab.Presence did not settle: #{inspect(Drab.Presence.stats())}")

      true ->
        Process.sleep(2)
        await_quiet(s, tries - 1)
    end
  end

  # On the sidecar a write does not wait for the sidecar, so "nothing
  # pending" can be read before it has seen an update (the count does not
  # move): fetchers_pids/0 exit once every write made before is applied and
  # its diff broadcast, as Phoenix's tests wait for them.
  defp await_fetchers do
    for pid <- Drab.Presence.fetchers_pids() do
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}, 10_000
    end
  end

  # Nothing is pending, but the dispatcher may be broadcasting what it took:
  # once it answers, everything it sent is in our mailbox.
  defp receive_diffs(topic) do
    :sys.get_state(Drab.Presence.Dispatcher)
    receive_all(topic, [])
  end

  defp receive_all(topic, acc) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} ->
        receive_all(topic, [payload | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  # The order of a key's metas is not part of the contract.
  defp sorted(presences) do
    Map.new(presences, fn {key, presence} ->
      {key, Map.update!(presence, :metas, &Enum.sort_by(&1, fn meta -> meta.phx_ref end))}
    end)
  end
end
