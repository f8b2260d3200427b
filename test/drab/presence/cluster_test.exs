defmodule Drab.Presence.ClusterTest do
  # Real nodes on 127.0.0.1: this VM (made distributed if it is not) and
  # :peer nodes, each running the same presence module. Every test runs
  # over :pg, and again through a Phoenix.PubSub server when phoenix_pubsub
  # is on the code path (tagged :phoenix, skipped with a message otherwise).
  # Every node runs the suite's backend (DRAB_PRESENCE_BACKEND, passed to
  # the peers in the module's options): scripts/test runs it once per backend.
  use Drab.Presence.ClusterCase

  alias Drab.Presence.{Cluster, ClusterRemote}

  @moduletag timeout: 120_000
  @moduletag :capture_log

  # Short periods, so that losses and repairs show within a test.
  @opts [diff_window: 20, heartbeat_period: 200, down_period: 2_000, permdown_period: 4_000]

  # Drab.Presence (test_helper) started before this VM was made distributed,
  # which renamed its pids: the sidecar's replies must still reach callers.
  test "a table started before the VM became distributed still answers" do
    assert Node.alive?()
    owner = spawn(fn -> Process.sleep(:infinity) end)
    topic = "distributed-after:#{System.unique_integer([:positive])}"
    assert {:ok, _} = Drab.Presence.track(owner, topic, "k", %{})
    assert Drab.Presence.count_connections(topic) == 1
    Process.exit(owner, :kill)
  end

  for transport <- [:pg, :pubsub] do
    describe "over #{transport}" do
      if transport == :pubsub, do: @describetag(:phoenix)

      setup context do
        module = Module.concat([__MODULE__, "P#{System.unique_integer([:positive])}"])
        pubsub = if unquote(transport) == :pubsub, do: Module.concat(module, PubSub)
        # Over :pg, no pubsub server on purpose (nil says so where Phoenix is loaded).
        opts = [pubsub_server: pubsub, backend: Drab.PresenceCase.backend()] ++ @opts
        {:ok, module: module, pubsub: pubsub, opts: opts, topic: "room:#{context.test}"}
      end

      test "three nodes converge, and each node's diffs rebuild its list", ctx do
        [b, c] = start_peers(2)
        nodes = [node(), b, c]
        for n <- nodes, do: start_presence(n, ctx)
        dashboards = for n <- nodes, do: {n, on(n, :dashboard, [ctx.module, ctx.topic])}

        owners =
          for {n, i} <- Enum.with_index(nodes) do
            keys = for k <- 1..100, do: "user#{i}-#{k}"
            on(n, :owner, [ctx.module, ctx.topic, ["shared" | keys], %{node: i}])
          end

        assert_everywhere(nodes, ctx, users: 301, connections: 303)
        assert %{replicas: 2, presences: 303, owners: 1} = ctx.module.stats()

        # An untrack, an exit and a new owner, on three different nodes.
        [owner_a, _owner_b, owner_c] = owners
        :ok = on(node(), :untrack, [owner_a, "user0-1"])
        send(owner_c, :stop)
        on(b, :owner, [ctx.module, ctx.topic, ["late"], %{node: 1}])
        assert_everywhere(nodes, ctx, users: 200 + 1, connections: 100 + 101 + 1)

        # The order of a key's metas is not part of the contract (phoenix.js
        # keeps them in arrival order).
        for {n, dashboard} <- dashboards do
          wait_until(fn -> by_ref(on(n, :view, [dashboard])) == by_ref(list(n, ctx)) end)
        end
      end

      test "a node that starts late gets the full state", ctx do
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        on(node(), :owner, [ctx.module, ctx.topic, ["a1", "a2"], %{}])
        on(b, :owner, [ctx.module, ctx.topic, ["b1"], %{}])
        assert_everywhere([node(), b], ctx, users: 3, connections: 3)

        [c] = start_peers(1)
        start_presence(c, ctx)
        assert_everywhere([node(), b, c], ctx, users: 3, connections: 3)
        assert list(c, ctx) == list(node(), ctx)
      end

      test "a node stopped, a node killed, and one restarted with a new incarnation", ctx do
        [b, c] = start_peers(2)
        for n <- [node(), b, c], do: start_presence(n, ctx)
        on(node(), :owner, [ctx.module, ctx.topic, ["a"], %{}])
        on(b, :owner, [ctx.module, ctx.topic, Enum.map(1..50, &"b#{&1}"), %{}])
        on(c, :owner, [ctx.module, ctx.topic, Enum.map(1..50, &"c#{&1}"), %{}])
        assert_everywhere([node(), b, c], ctx, users: 101, connections: 101)

        stop_peer(c)
        assert_everywhere([node(), b], ctx, users: 51, connections: 51)

        kill_peer(b)
        assert_everywhere([node()], ctx, users: 1, connections: 1)

        # The same name again: a new table, so a new incarnation.
        [b2] = start_peers(1, names: [name_of(b)])
        assert b2 == b
        start_presence(b, ctx)
        on(b, :owner, [ctx.module, ctx.topic, ["b-again"], %{}])
        assert_everywhere([node(), b], ctx, users: 2, connections: 2)

        incarnations = for {{^b, incarnation}, %{status: :live}} <- replicas(ctx), do: incarnation
        assert length(incarnations) == 1
      end

      test "a netsplit drops each side's presences on the other, and healing restores them", ctx do
        # Once split, b and c reconnect only when told to.
        [b, c] = start_peers(2, isolated: true)
        mesh([b, c])
        for n <- [node(), b, c], do: start_presence(n, ctx)
        on(b, :owner, [ctx.module, ctx.topic, ["b"], %{}])
        on(c, :owner, [ctx.module, ctx.topic, ["c"], %{}])
        assert_everywhere([node(), b, c], ctx, users: 2, connections: 2)

        netsplit([b], [c])
        assert_everywhere([b], ctx, users: 1, connections: 1)
        assert_everywhere([c], ctx, users: 1, connections: 1)
        # This node still sees both sides.
        assert_everywhere([node()], ctx, users: 2, connections: 2)

        # A change on one side during the split.
        on(b, :owner, [ctx.module, ctx.topic, ["b-during"], %{}])
        assert_everywhere([node()], ctx, users: 3, connections: 3)

        heal([b], [c])
        assert_everywhere([node(), b, c], ctx, users: 3, connections: 3)
        assert list(b, ctx) == list(c, ctx)
      end

      test "a lost delta is noticed at the next delta and repaired", ctx do
        # No heartbeat during the test: only the next delta can reveal the gap.
        opts =
          Keyword.merge(ctx.opts,
            heartbeat_period: 60_000,
            down_period: 120_000,
            permdown_period: 120_000
          )

        ctx = %{ctx | opts: opts}
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        on(b, :owner, [ctx.module, ctx.topic, ["first"], %{}])
        assert_everywhere([node(), b], ctx, users: 1, connections: 1)

        :ok = :erpc.call(b, Cluster, :drop_next_delta, [ctx.module])
        on(b, :owner, [ctx.module, ctx.topic, ["lost"], %{}])
        Process.sleep(300)
        assert counts(node(), ctx) == {1, 1}

        on(b, :owner, [ctx.module, ctx.topic, ["next"], %{}])
        assert_everywhere([node(), b], ctx, users: 3, connections: 3)
      end

      test "a restarted cluster process keeps its peers' presences and goes on", ctx do
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        on(b, :owner, [ctx.module, ctx.topic, Enum.map(1..10, &"b#{&1}"), %{}])
        assert_everywhere([node()], ctx, users: 10, connections: 10)
        dashboard = on(node(), :dashboard, [ctx.module, ctx.topic])

        cluster = Process.whereis(Cluster.name(ctx.module))
        Process.exit(cluster, :kill)
        wait_until(fn -> Process.whereis(Cluster.name(ctx.module)) not in [nil, cluster] end)
        Process.sleep(300)
        assert counts(node(), ctx) == {10, 10}

        on(b, :owner, [ctx.module, ctx.topic, ["b-after"], %{}])
        assert_everywhere([node()], ctx, users: 11, connections: 11)
        wait_until(fn -> by_ref(on(node(), :view, [dashboard])) == by_ref(list(node(), ctx)) end)
        assert [{_, %{status: :live}}] = Map.to_list(replicas(ctx))
        # The resync changed nothing that was already there: no leave at all.
        assert on(node(), :ever_left, [dashboard]) == MapSet.new()
      end

      test "a peer silent past down_period leaves, and comes back when it speaks", ctx do
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        on(b, :owner, [ctx.module, ctx.topic, ["b"], %{}])
        assert_everywhere([node()], ctx, users: 1, connections: 1)

        # Silent, but its node still connected: no nodedown will come.
        cluster_b = call(b, Process, :whereis, [Cluster.name(ctx.module)])
        :ok = call(b, :sys, :suspend, [cluster_b])
        assert_everywhere([node()], ctx, users: 0, connections: 0)
        assert [{_, %{status: :down}}] = Map.to_list(replicas(ctx))

        :ok = call(b, :sys, :resume, [cluster_b])
        assert_everywhere([node()], ctx, users: 1, connections: 1)
      end

      @tag :sidecar_only
      test "a sidecar killed -9 during tracking: both nodes converge to the live presences",
           ctx do
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        owner_b = on(b, :owner, [ctx.module, ctx.topic, Enum.map(1..50, &"b#{&1}"), %{}])
        assert_everywhere([node(), b], ctx, users: 50, connections: 50)
        incarnation = call(b, Cluster, :replicas, [ctx.module]) |> Map.keys()

        # This node's sidecar dies in the middle of 2,000 tracks, holding its
        # replica of b and part of its own presences.
        keys = Enum.map(1..2_000, &"a#{&1}")
        tracker = Task.async(fn -> on(node(), :owner, [ctx.module, ctx.topic, keys, %{}]) end)
        Process.sleep(5)
        {_, tracked_at_kill} = counts(node(), ctx)
        os_pid = on(node(), :sidecar_os_pid, [ctx.module])
        {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])
        Task.await(tracker, 30_000)
        # Tracks do not wait for the sidecar: they may all be in before the
        # port owner has seen it die.
        wait_until(fn -> on(node(), :sidecar_os_pid, [ctx.module]) not in [nil, os_pid] end)
        # The 2,000 tracks take 20-60 ms: the kill came in their middle.
        assert tracked_at_kill < 2_050

        # Changes on both sides after the restart: a join here, an exit there.
        on(node(), :owner, [ctx.module, ctx.topic, ["a-after"], %{}])
        send(owner_b, :stop)
        on(b, :owner, [ctx.module, ctx.topic, ["b-after"], %{}])
        assert_everywhere([node(), b], ctx, users: 2_002, connections: 2_002)
        assert by_ref(list(b, ctx)) == by_ref(list(node(), ctx))

        # Still the same replica for b: the same name, numbering going on.
        assert call(b, Cluster, :replicas, [ctx.module]) |> Map.keys() == incarnation
        assert [{_, %{status: :live}}] = Map.to_list(call(b, Cluster, :replicas, [ctx.module]))
      end

      test "a lost last delta is repaired by the next heartbeat", ctx do
        [b] = start_peers(1)
        for n <- [node(), b], do: start_presence(n, ctx)
        on(b, :owner, [ctx.module, ctx.topic, ["first"], %{}])
        assert_everywhere([node(), b], ctx, users: 1, connections: 1)

        :ok = :erpc.call(b, Cluster, :drop_next_delta, [ctx.module])
        on(b, :owner, [ctx.module, ctx.topic, ["lost"], %{}])
        assert_everywhere([node()], ctx, users: 2, connections: 2)
      end
    end
  end

  ## Nodes

  defp name_of(node), do: node |> Atom.to_string() |> String.split("@") |> hd() |> String.to_atom()

  defp start_presence(node, ctx) do
    if ctx.pubsub, do: :ok = on(node, :start_pubsub, [ctx.pubsub])
    :ok = on(node, :start, [ctx.module, ctx.opts])
  end

  defp on(node, function, args), do: :erpc.call(node, ClusterRemote, function, args, 30_000)

  ## Views

  defp counts(node, ctx) do
    {users, connections, _} = on(node, :summary, [ctx.module, ctx.topic])
    {users, connections}
  end

  defp list(node, ctx) do
    {_, _, list} = on(node, :summary, [ctx.module, ctx.topic])
    list
  end

  defp by_ref(presences) do
    Map.new(presences, fn {key, %{metas: metas}} -> {key, Enum.sort_by(metas, & &1.phx_ref)} end)
  end

  defp replicas(ctx), do: Cluster.replicas(ctx.module)

  defp assert_everywhere(nodes, ctx, users: users, connections: connections) do
    for node <- nodes do
      wait_until(fn -> counts(node, ctx) == {users, connections} end, 5_000)

      {_, _, list} = on(node, :summary, [ctx.module, ctx.topic])
      assert map_size(list) == users
      assert list |> Enum.map(fn {_, %{metas: m}} -> length(m) end) |> Enum.sum() == connections
    end
  end
end
