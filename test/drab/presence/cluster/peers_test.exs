defmodule Drab.Presence.Cluster.PeersTest do
  # The cluster's peer state machine on its own: events in, state and
  # actions out, no process, no node (cluster_test.exs runs it between
  # nodes).
  use ExUnit.Case, async: true

  alias Drab.Presence.Cluster.Peers

  @me {:a@host, "inc-a"}
  @b {:b@host, "inc-b1"}
  @b2 {:b@host, "inc-b2"}
  @c {:c@host, "inc-c"}
  @periods [heartbeat_period: 100, down_period: 900, permdown_period: 5_000]

  defp ids(name), do: :erlang.phash2(name)
  defp peers(now \\ 0), do: Peers.new(@me, @periods, now)

  defp live(peers, name, seq, now) do
    from = self()
    {peers, _} = Peers.hello(peers, name, from, now, &ids/1)
    {peers, _} = Peers.state(peers, @me, name, seq, ["chunk"], now, &ids/1)
    Peers.synced(peers, name, seq)
  end

  test "a hello from a new peer: our state to it, then its state asked for" do
    from = self()
    {peers, actions} = Peers.hello(peers(), @b, from, 10, &ids/1)

    assert actions == [{:send_state, @b, from}, {:peer_up, @b}, {:request_state, @b, from}]
    assert Peers.replicas(peers) == %{@b => %{id: ids(@b), status: :syncing, seq: 0}}
  end

  test "our own hello changes nothing" do
    assert Peers.hello(peers(), @me, self(), 10, &ids/1) == {peers(), []}
  end

  test "a state addressed to another incarnation of this node is ignored" do
    assert {_, []} = Peers.state(peers(), {:a@host, "old"}, @b, 3, ["x"], 10, &ids/1)
  end

  test "a state makes the peer live at its seq, without asking for it again" do
    {peers, actions} = Peers.state(peers(), @me, @b, 3, ["x"], 10, &ids/1)
    assert actions == [{:peer_up, @b}, {:sync_replica, @b, ids(@b), 3, ["x"]}]
    peers = Peers.synced(peers, @b, 3)
    assert %{@b => %{status: :live, seq: 3}} = Peers.replicas(peers)
  end

  describe "deltas" do
    setup do: %{peers: live(peers(), @b, 3, 10), from: self()}

    test "the next one is applied, and its seq kept once the backend took it", ctx do
      {peers, actions} = Peers.delta(ctx.peers, @b, ctx.from, 4, "d", 20, &ids/1)
      assert actions == [{:apply_delta, @b, ids(@b), 4, "d", ctx.from}]
      assert %{@b => %{seq: 4}} = Peers.replicas(Peers.delta_applied(peers, @b, 4))
    end

    test "an old one is ignored", ctx do
      assert {_, []} = Peers.delta(ctx.peers, @b, ctx.from, 3, "d", 20, &ids/1)
    end

    test "a gap asks for the state, and deltas wait until it is in", ctx do
      {peers, actions} = Peers.delta(ctx.peers, @b, ctx.from, 6, "d", 20, &ids/1)
      assert actions == [{:request_state, @b, ctx.from}]
      assert %{@b => %{status: :syncing}} = Peers.replicas(peers)
      assert {_, []} = Peers.delta(peers, @b, ctx.from, 7, "d", 30, &ids/1)
    end

    test "a malformed one asks for the state", ctx do
      {peers, actions} = Peers.bad_delta(ctx.peers, @b, ctx.from, 20)
      assert actions == [{:request_state, @b, ctx.from}]
      assert %{@b => %{status: :syncing}} = Peers.replicas(peers)
    end

    test "a heartbeat ahead of what was applied asks for the state", ctx do
      assert {_, []} = Peers.heartbeat(ctx.peers, @b, ctx.from, 3, 20, &ids/1)

      assert {_, [{:request_state, @b, _}]} =
               Peers.heartbeat(ctx.peers, @b, ctx.from, 4, 20, &ids/1)
    end
  end

  test "a request unanswered for two heartbeat periods is asked again" do
    from = self()
    {peers, _} = Peers.hello(peers(), @b, from, 0, &ids/1)
    assert {_, []} = Peers.heartbeat(peers, @b, from, 0, 199, &ids/1)
    assert {_, [{:request_state, @b, ^from}]} = Peers.heartbeat(peers, @b, from, 0, 200, &ids/1)
  end

  test "a new incarnation of a known node replaces the old one" do
    peers = live(peers(), @b, 3, 10)
    {peers, actions} = Peers.hello(peers, @b2, self(), 20, &ids/1)

    assert {:forget_replica, @b, ids(@b)} in actions
    assert Map.keys(Peers.replicas(peers)) == [@b2]
  end

  describe "going away" do
    setup do: %{peers: peers() |> live(@b, 3, 0) |> live(@c, 1, 0)}

    test "nodedown takes that node's peers down, once", %{peers: peers} do
      {peers, actions} = Peers.nodedown(peers, :b@host, 50)
      assert actions == [{:drop_replica, @b, ids(@b), "its node went down"}]
      assert %{@b => %{status: :down, seq: 0}, @c => %{status: :live}} = Peers.replicas(peers)
      assert {_, []} = Peers.nodedown(peers, :b@host, 60)
    end

    test "silent peers go down after down_period, and are forgotten after permdown_period",
         %{peers: peers} do
      from = self()
      {peers, _} = Peers.heartbeat(peers, @c, from, 1, 500, &ids/1)

      {peers, actions} = Peers.tick(peers, 0, 900)
      assert {:drop_replica, @b, ids(@b), "it was silent for 900 ms"} in actions
      refute Enum.any?(actions, &match?({:drop_replica, @c, _, _}, &1))

      {peers, actions} = Peers.tick(peers, 0, 5_899)
      refute Enum.any?(actions, &match?({:forget_replica, @b, _}, &1))
      {peers, actions} = Peers.tick(peers, 0, 5_900)
      assert {:forget_replica, @b, ids(@b)} in actions
      refute Map.has_key?(Peers.replicas(peers), @b)
    end

    test "a down peer that speaks again is synced anew", %{peers: peers} do
      from = self()
      {peers, _} = Peers.nodedown(peers, :b@host, 50)
      {peers, actions} = Peers.heartbeat(peers, @b, from, 3, 60, &ids/1)
      assert actions == [{:peer_up, @b}, {:request_state, @b, from}]
      assert %{@b => %{status: :syncing}} = Peers.replicas(peers)
    end

    test "goodbye forgets the peer at once", %{peers: peers} do
      {peers, actions} = Peers.goodbye(peers, @b)
      assert actions == [{:forget_replica, @b, ids(@b)}]
      assert {_, []} = Peers.goodbye(peers, @b)
    end
  end

  test "heartbeats: each period with a new delta, else every third of down_period" do
    peers = peers(0)
    {peers, [{:broadcast, {:heartbeat, 0}}]} = Peers.tick(peers, 0, 100)
    assert {_, []} = Peers.tick(peers, 0, 200)
    assert {_, [{:broadcast, {:heartbeat, 1}}]} = Peers.tick(peers, 1, 200)
    assert {_, [{:broadcast, {:heartbeat, 0}}]} = Peers.tick(peers, 0, 400)
  end

  test "lost replicas: every peer not down is synced anew" do
    peers = peers() |> live(@b, 3, 0) |> live(@c, 1, 0)
    {peers, _} = Peers.nodedown(peers, :c@host, 10)
    {peers, actions} = Peers.replicas_lost(peers, 20)

    assert actions == [{:broadcast, :state_request}]
    assert %{@b => %{status: :syncing}, @c => %{status: :down}} = Peers.replicas(peers)
  end

  test "adopted peers: kept on connected nodes, dropped on gone ones" do
    known = [{@b, 7}, {@c, 8}]
    {peers, actions} = Peers.adopt(peers(), known, MapSet.new([:b@host]), 0)

    assert actions == [{:drop_replica, @c, 8, "its node was gone when this process started"}]

    assert Peers.replicas(peers) == %{
             @b => %{id: 7, status: :syncing, seq: 0},
             @c => %{id: 8, status: :down, seq: 0}
           }

    assert {_, []} = Peers.adopt(peers(), known, :all, 0)
  end
end
