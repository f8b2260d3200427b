defmodule Drab.Presence.Cluster do
  @moduledoc false
  # Cluster mode: one process per presence module and node, replicating this
  # node's presences to the same module on every other node, and theirs here.
  #
  # Each node is the only writer of its own presences, so the cluster's state
  # is the union of per-node sets and nothing conflicts. A node's set is
  # named by its node name plus the incarnation of its table (a UUID made
  # with the table): a node that restarts is a new replica, and what others
  # held of its previous life is dropped, never merged.
  #
  #   node A                                        node B
  #   track/untrack ─▶ table ─(each diff window)─▶ delta {seq} ─▶ apply ─▶ table ─▶ presence_diff
  #                     ▲                                                          (B's subscribers)
  #                     └─ state ◀─ sync on first contact, after a gap or a split ─┘
  #
  # The table records this node's changes as the dispatcher takes each
  # window's diffs, and wakes this process, which sends them as one delta,
  # numbered, to every peer. A peer applies delta n+1 after n; a gap (a
  # delta lost, or this process restarted in between), or a heartbeat
  # announcing a later number, makes it ask for the full state, which
  # replaces what it held of this node with only the differences as diffs.
  # Joins and leaves are idempotent, so a state and the deltas around it may
  # overlap.
  #
  # Transports (Cluster.Transport): a Phoenix.PubSub server when one is
  # configured, else OTP's :pg (:pg2 on OTP 22) over Erlang distribution.
  #
  # A peer goes down on nodedown where there is distribution, or after
  # `down_period` without a word from it: its presences leave at once, with
  # leave diffs. If it speaks again, it is synced anew. After
  # `permdown_period` down, it is forgotten for good.
  # What is known of each peer, and what to do on each event, is decided by
  # Cluster.Peers, a pure state machine; this process carries out its
  # actions: messages, backend calls, logs and telemetry.
  use GenServer
  require Logger

  alias Drab.Presence.{Runtime, Telemetry}
  alias Drab.Presence.Cluster.{Peers, Transport}

  # Bumped when a message changes shape; a peer speaking another version is
  # refused, loudly, once.
  @protocol 1
  @tag :drab_presence_cluster

  @doc false
  @spec child_spec({module(), keyword()}) :: Supervisor.child_spec()
  def child_spec({module, opts}) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [module, opts]}}
  end

  @doc false
  @spec start_link(module(), keyword()) :: GenServer.on_start()
  def start_link(module, opts) do
    GenServer.start_link(__MODULE__, {module, opts}, name: name(module))
  end

  @doc "The registered name of `module`'s cluster process."
  @spec name(module()) :: atom()
  def name(module), do: Module.concat(module, Cluster)

  @doc """
  The peers `module` knows on this node, for tests and stats:
  `%{{node, incarnation} => %{id: ..., status: ..., seq: ...}}`.
  """
  @spec replicas(module()) :: map()
  def replicas(module), do: GenServer.call(name(module), :replicas)

  @doc false
  # Test hook: the next delta is taken and numbered but not sent, as if the
  # network had lost it. Peers must notice the gap and resync.
  @spec drop_next_delta(module()) :: :ok
  def drop_next_delta(module), do: GenServer.call(name(module), :drop_next_delta)

  @impl true
  def init({module, opts}) do
    Process.flag(:trap_exit, true)
    runtime = Runtime.fetch!(module)
    incarnation = runtime.backend.set_replicator(runtime.table, self())
    :ok = :net_kernel.monitor_nodes(true)
    transport = Transport.join(Transport.choose(opts), module)
    now = now()

    state = %{
      module: module,
      runtime: runtime,
      transport: transport,
      heartbeat_period: Keyword.fetch!(opts, :heartbeat_period),
      peers: Peers.new({node(), incarnation}, opts, now),
      drop_next_delta?: false,
      refused_versions: MapSet.new()
    }

    # The peers a predecessor of this process knew, from the table.
    known =
      for {name, id} <- runtime.backend.replica_ids(runtime.table),
          do: {:erlang.binary_to_term(name), id}

    connected =
      if Transport.beyond_distribution?(transport), do: :all, else: MapSet.new(Node.list())

    state = run(state, Peers.adopt(state.peers, known, connected, now))

    # Anything recorded before this process (a predecessor's leftovers) goes
    # out now; peers that find a gap resync.
    send(self(), :drab_presence_delta)
    broadcast(state, {:hello, self(), me(state)})
    schedule_heartbeat(state)
    {:ok, state}
  end

  @impl true
  def handle_call(:replicas, _from, state), do: {:reply, Peers.replicas(state.peers), state}

  def handle_call(:drop_next_delta, _from, state),
    do: {:reply, :ok, %{state | drop_next_delta?: true}}

  @impl true
  def handle_info(:drab_presence_delta, state) do
    %Runtime{backend: backend, table: table} = state.runtime

    case {backend.take_delta(table), state} do
      {:none, _} ->
        {:noreply, state}

      {{_seq, _delta}, %{drop_next_delta?: true}} ->
        {:noreply, %{state | drop_next_delta?: false}}

      {{seq, delta}, _} ->
        broadcast(state, {:delta, self(), me(state), seq, delta})
        {:noreply, state}
    end
  end

  def handle_info(:heartbeat, state) do
    schedule_heartbeat(state)
    # The seq of the last delta taken: a peer behind it lost one.
    seq = state.runtime.backend.delta_seq(state.runtime.table)
    {:noreply, run(state, Peers.tick(state.peers, seq, now()))}
  end

  def handle_info({:nodedown, node}, state),
    do: {:noreply, run(state, Peers.nodedown(state.peers, node, now()))}

  def handle_info({:nodeup, _node}, state) do
    # pg learns the new node's members a moment after nodeup; a hello then
    # makes the first sync not wait for a heartbeat.
    Process.send_after(self(), :hello, 100)
    {:noreply, state}
  end

  # A sidecar backend's sidecar died and was replayed: what it held of the
  # other nodes died with it. Every peer is synced anew; a lost request is
  # asked again after two heartbeats.
  def handle_info(:drab_presence_replicas_lost, state) do
    Logger.info("#{inspect(state.module)}: the sidecar restarted; resyncing every peer")
    {:noreply, run(state, Peers.replicas_lost(state.peers, now()))}
  end

  def handle_info(:hello, state) do
    broadcast(state, {:hello, self(), me(state)})
    {:noreply, state}
  end

  def handle_info({@tag, @protocol, message}, state) do
    {:noreply, receive_message(message, state)}
  end

  def handle_info({@tag, version, _message}, state) do
    if MapSet.member?(state.refused_versions, version) do
      {:noreply, state}
    else
      Logger.error(
        "#{inspect(state.module)} ignores cluster messages of protocol version " <>
          "#{inspect(version)} (this node speaks #{@protocol}): run one drab_presence " <>
          "version across the cluster"
      )

      {:noreply, %{state | refused_versions: MapSet.put(state.refused_versions, version)}}
    end
  end

  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}

  def handle_info(message, state) do
    Logger.debug("#{inspect(__MODULE__)} ignored #{inspect(message)}")
    {:noreply, state}
  end

  @impl true
  def terminate(reason, state) do
    # Stopping on purpose: peers drop this node's presences now rather than
    # at nodedown or after down_period. A crash says nothing: the successor
    # carries on with the same table, and peers keep what they have.
    if reason in [:normal, :shutdown] or match?({:shutdown, _}, reason) do
      broadcast(state, {:goodbye, me(state)})
      state.runtime.backend.set_replicator(state.runtime.table, nil)
    end

    :ok
  end

  ## Messages from peers, decided by Peers

  defp receive_message(message, state) do
    peers = state.peers
    now = now()
    ids = &replica_id(state, &1)

    case message do
      {:goodbye, name} ->
        run(state, Peers.goodbye(peers, name))

      {:hello, from, name} ->
        run(state, Peers.hello(peers, name, from, now, ids))

      {:state_request, from, name} ->
        run(state, Peers.state_request(peers, name, from, now, ids))

      {:heartbeat, from, name, seq} ->
        run(state, Peers.heartbeat(peers, name, from, seq, now, ids))

      {:delta, from, name, seq, delta} ->
        run(state, Peers.delta(peers, name, from, seq, delta, now, ids))

      {:state, to, name, seq, chunks} ->
        run(state, Peers.state(peers, to, name, seq, chunks, now, ids))

      _ ->
        malformed(state, message)
    end
  end

  defp malformed(state, message) do
    Logger.error(
      "#{inspect(state.module)} ignored a malformed cluster message: #{inspect(message, limit: 5)}"
    )

    state
  end

  # Replica ids live with the table, so that presences a predecessor of this
  # process applied stay with their node.
  defp replica_id(state, name),
    do: state.runtime.backend.replica_id(state.runtime.table, :erlang.term_to_binary(name))

  ## Peers' actions

  defp run(state, {peers, actions}),
    do: Enum.reduce(actions, %{state | peers: peers}, &act/2)

  defp act({:broadcast, :state_request}, state) do
    broadcast(state, {:state_request, self(), me(state)})
    state
  end

  defp act({:broadcast, {:heartbeat, seq}}, state) do
    broadcast(state, {:heartbeat, self(), me(state), seq})
    state
  end

  defp act({:request_state, name, pid}, state) do
    send_to(state, name, pid, {:state_request, self(), me(state)})
    state
  end

  defp act({:send_state, name, pid}, state) do
    {seq, chunks} = state.runtime.backend.local_state(state.runtime.table)
    send_to(state, name, pid, {:state, name, me(state), seq, chunks})
    state
  end

  defp act({:apply_delta, name, id, seq, delta, from}, state) do
    case state.runtime.backend.apply_delta(state.runtime.table, id, delta) do
      :ok ->
        %{state | peers: Peers.delta_applied(state.peers, name, seq)}

      {:error, :bad_delta} ->
        Logger.error(
          "#{inspect(state.module)} got a malformed delta from #{inspect(name)}; resyncing"
        )

        run(state, Peers.bad_delta(state.peers, name, from, now()))
    end
  end

  defp act({:sync_replica, name, id, seq, chunks}, state) do
    case state.runtime.backend.sync_replica(state.runtime.table, id, chunks) do
      :ok ->
        bytes = Enum.reduce(chunks, 0, &(byte_size(&1) + &2))
        peer_event(state, :resync, name, %{bytes: bytes})
        %{state | peers: Peers.synced(state.peers, name, seq)}

      {:error, :bad_delta} ->
        Logger.error("#{inspect(state.module)} got a malformed state from #{inspect(name)}")
        state
    end
  end

  defp act({:drop_replica, name, id, why}, state) do
    dropped = state.runtime.backend.drop_replica(state.runtime.table, id)

    Logger.info(
      "#{inspect(state.module)}: #{inspect(name)} is down (#{why}); " <>
        "#{dropped} of its presences left"
    )

    peer_event(state, :peer_down, name, %{presences: dropped}, %{reason: why})
    state
  end

  defp act({:forget_replica, _name, id}, state) do
    state.runtime.backend.forget_replica(state.runtime.table, id)
    state
  end

  defp act({:peer_up, name}, state) do
    peer_event(state, :peer_up, name, %{})
    state
  end

  defp peer_event(state, event, {node, _incarnation}, measurements, metadata \\ %{}) do
    metadata = Map.merge(%{module: state.module, node: node}, metadata)
    Telemetry.execute([:cluster, event], measurements, metadata)
  end

  ## Sending

  defp me(state), do: state.peers.me

  defp broadcast(state, message),
    do: Transport.broadcast(state.transport, {@tag, @protocol, message})

  defp send_to(state, {node, _incarnation}, pid, message),
    do: Transport.send_to(state.transport, node, pid, {@tag, @protocol, message})

  defp schedule_heartbeat(state), do: Process.send_after(self(), :heartbeat, state.heartbeat_period)

  defp now, do: System.monotonic_time(:millisecond)
end
