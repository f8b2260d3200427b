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
  # Transports: a Phoenix.PubSub server when one is configured (every
  # adapter works, distribution or not), else OTP's :pg (:pg2 on OTP 22)
  # over Erlang distribution. Peers are found as the app's nodes already
  # find each other; this process only talks to the members of its group.
  #
  # A peer goes down on nodedown where there is distribution, or after
  # `down_period` without a word from it: its presences leave at once, with
  # leave diffs. If it speaks again, it is synced anew. After
  # `permdown_period` down, it is forgotten for good.
  use GenServer
  require Logger

  alias Drab.Presence.{Runtime, Telemetry}

  @compile {:no_warn_undefined, [Phoenix.PubSub]}

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
  How `module` replicates with these options: `{:pubsub, server}`, `:pg`, or
  `nil` when cluster mode is off.
  """
  @spec transport(keyword()) :: {:pubsub, atom()} | :pg | nil
  def transport(opts) do
    cond do
      opts[:cluster] == false ->
        nil

      opts[:pubsub_server] && Code.ensure_loaded?(Phoenix.PubSub) ->
        {:pubsub, opts[:pubsub_server]}

      true ->
        :pg
    end
  end

  @doc "The :pg scope `module`'s cluster processes meet in."
  @spec pg_scope(module()) :: atom()
  def pg_scope(module), do: Module.concat(module, ClusterScope)

  @doc """
  The peers `module` knows on this node, for tests and stats:
  `%{{node, incarnation} => %{status: ..., seq: ..., presences: ...}}`.
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

    state = %{
      module: module,
      runtime: runtime,
      transport: join(transport(opts), module),
      incarnation: incarnation,
      heartbeat_period: Keyword.fetch!(opts, :heartbeat_period),
      down_period: Keyword.fetch!(opts, :down_period),
      permdown_period: Keyword.fetch!(opts, :permdown_period),
      # {node, incarnation} => %{id, status: :syncing | :live | :down, seq, heard_at, down_at}
      replicas: %{},
      # {seq announced, when}
      last_heartbeat: {nil, now()},
      drop_next_delta?: false,
      refused_versions: MapSet.new()
    }

    state = adopt_known_replicas(state)

    # Anything recorded before this process (a predecessor's leftovers) goes
    # out now; peers that find a gap resync.
    send(self(), :drab_presence_delta)
    broadcast(state, {:hello, self(), me(state)})
    schedule_heartbeat(state)
    {:ok, state}
  end

  @impl true
  def handle_call(:replicas, _from, state) do
    replicas =
      Map.new(state.replicas, fn {name, replica} ->
        {name, Map.take(replica, [:id, :status, :seq])}
      end)

    {:reply, replicas, state}
  end

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

  # A heartbeat goes out each period in which this node sent a delta, so a
  # lost last delta is noticed within a period; a quiet node only says it
  # is alive, every third of down_period (Phoenix.Tracker is as quiet).
  def handle_info(:heartbeat, state) do
    schedule_heartbeat(state)
    seq = current_seq(state)
    now = now()
    {last_seq, last_at} = state.last_heartbeat

    state =
      if seq != last_seq or now - last_at >= quiet_period(state) do
        broadcast(state, {:heartbeat, self(), me(state), seq})
        %{state | last_heartbeat: {seq, now}}
      else
        state
      end

    {:noreply, expire(state, now)}
  end

  def handle_info({:nodedown, node}, state) do
    downs = for {{^node, _} = name, %{status: status}} <- state.replicas, status != :down, do: name
    {:noreply, Enum.reduce(downs, state, &down(&2, &1, "its node went down"))}
  end

  def handle_info({:nodeup, _node}, state) do
    # pg learns the new node's members a moment after nodeup; a hello then
    # makes the first sync not wait for a heartbeat.
    Process.send_after(self(), :hello, 100)
    {:noreply, state}
  end

  # A sidecar backend's sidecar died and was replayed: what it held of the
  # other nodes died with it. Every peer is synced anew (deltas wait until
  # its state is in); a lost request is asked again after two heartbeats.
  def handle_info(:drab_presence_replicas_lost, state) do
    Logger.info("#{inspect(state.module)}: the sidecar restarted; resyncing every peer")
    now = now()

    replicas =
      Map.new(state.replicas, fn
        {name, %{status: :down} = replica} -> {name, replica}
        {name, replica} -> {name, %{replica | status: :syncing, requested_at: now}}
      end)

    state = %{state | replicas: replicas}
    broadcast(state, {:state_request, self(), me(state)})
    {:noreply, state}
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

  ## Messages from peers

  defp receive_message({:goodbye, name}, state) do
    if Map.has_key?(state.replicas, name), do: forget(state, name), else: state
  end

  defp receive_message({:hello, from, name}, state) do
    if name == me(state) do
      state
    else
      # Our state first: the newcomer then knows us before it asks.
      send_state(state, from, name)
      heard(state, name, from)
    end
  end

  defp receive_message({:state_request, from, name}, state) do
    state = heard(state, name, from)
    send_state(state, from, name)
    state
  end

  defp receive_message({:heartbeat, from, name, seq}, state) do
    state = heard(state, name, from)
    now = now()
    # Guards cannot read map fields before Elixir 1.11.
    %{heartbeat_period: heartbeat_period} = state

    case state.replicas[name] do
      %{status: :live, seq: applied} when seq > applied ->
        request_state(state, name, from)

      # A request or its answer got lost (a peer restarting, a split).
      %{status: :syncing, requested_at: at} when now - at >= 2 * heartbeat_period ->
        request_state(state, name, from)

      _ ->
        state
    end
  end

  defp receive_message({:delta, from, name, seq, delta}, state) do
    state = heard(state, name, from)

    case state.replicas[name] do
      %{status: :live, seq: applied, id: id} when seq == applied + 1 ->
        case state.runtime.backend.apply_delta(state.runtime.table, id, delta) do
          :ok ->
            put_replica(state, name, seq: seq)

          {:error, :bad_delta} ->
            Logger.error(
              "#{inspect(state.module)} got a malformed delta from #{inspect(name)}; resyncing"
            )

            request_state(state, name, from)
        end

      %{status: :live, seq: applied} when seq <= applied ->
        state

      %{status: :live} ->
        request_state(state, name, from)

      _syncing ->
        state
    end
  end

  defp receive_message({:state, to, name, seq, chunks}, state) do
    if to != me(state) do
      # A direct broadcast reaches this node; it was for another incarnation.
      state
    else
      state = heard(state, name, nil, false)
      %{id: id, seq: applied, status: status} = state.replicas[name]

      if status == :syncing or seq >= applied do
        case state.runtime.backend.sync_replica(state.runtime.table, id, chunks) do
          :ok ->
            bytes = Enum.reduce(chunks, 0, &(byte_size(&1) + &2))
            peer_event(state, :resync, name, %{bytes: bytes})
            put_replica(state, name, seq: seq, status: :live)

          {:error, :bad_delta} ->
            Logger.error("#{inspect(state.module)} got a malformed state from #{inspect(name)}")
            state
        end
      else
        state
      end
    end
  end

  defp receive_message(message, state) do
    Logger.error(
      "#{inspect(state.module)} ignored a malformed cluster message: #{inspect(message, limit: 5)}"
    )

    state
  end

  # Notes that `name` spoke. A peer not known yet (or down, or from a new
  # incarnation of a known node) is synced from scratch, unless what it
  # said is its state.
  defp heard(state, {node, _incarnation} = name, from, request? \\ true) do
    now = now()

    case state.replicas do
      %{^name => %{status: :down}} ->
        peer_event(state, :peer_up, name, %{})
        state = put_replica(state, name, heard_at: now, down_at: nil, status: :syncing)
        if request?, do: request_state(state, name, from), else: state

      %{^name => _} ->
        put_replica(state, name, heard_at: now)

      %{} ->
        peer_event(state, :peer_up, name, %{})
        state = forget_other_incarnations(state, node, name)

        replica = %{
          id: replica_id(state, name),
          status: :syncing,
          seq: 0,
          heard_at: now,
          requested_at: now,
          down_at: nil
        }

        state = %{state | replicas: Map.put(state.replicas, name, replica)}

        if request?, do: request_state(state, name, from), else: state
    end
  end

  defp forget_other_incarnations(state, node, name) do
    stale = for {{^node, _} = other, _} <- state.replicas, other != name, do: other
    Enum.reduce(stale, state, &forget(&2, &1))
  end

  defp request_state(state, name, from) do
    send_to(state, name, from, {:state_request, self(), me(state)})
    put_replica(state, name, status: :syncing, requested_at: now())
  end

  defp send_state(state, to_pid, to_name) do
    {seq, chunks} = state.runtime.backend.local_state(state.runtime.table)
    send_to(state, to_name, to_pid, {:state, to_name, me(state), seq, chunks})
  end

  ## Peers going away

  defp expire(state, now) do
    %{down_period: down_period, permdown_period: permdown_period} = state

    Enum.reduce(state.replicas, state, fn
      {name, %{status: :down, down_at: at}}, acc when now - at >= permdown_period ->
        forget(acc, name)

      {name, %{status: status, heard_at: at}}, acc
      when status != :down and now - at >= down_period ->
        down(acc, name, "it was silent for #{down_period} ms")

      _, acc ->
        acc
    end)
  end

  # Its presences leave now; it is remembered, down, until it speaks again
  # (then it is synced anew) or permdown_period passes.
  defp down(state, name, why) do
    %{id: id} = state.replicas[name]
    dropped = state.runtime.backend.drop_replica(state.runtime.table, id)

    Logger.info(
      "#{inspect(state.module)}: #{inspect(name)} is down (#{why}); " <>
        "#{dropped} of its presences left"
    )

    peer_event(state, :peer_down, name, %{presences: dropped}, %{reason: why})

    put_replica(state, name, status: :down, down_at: now(), seq: 0)
  end

  defp peer_event(state, event, {node, _incarnation}, measurements, metadata \\ %{}) do
    metadata = Map.merge(%{module: state.module, node: node}, metadata)
    Telemetry.execute([:cluster, event], measurements, metadata)
  end

  defp forget(state, name) do
    %{id: id} = state.replicas[name]
    state.runtime.backend.forget_replica(state.runtime.table, id)
    %{state | replicas: Map.delete(state.replicas, name)}
  end

  # Replica ids live with the table, so that presences a predecessor of this
  # process applied stay with their node.
  defp replica_id(state, name),
    do: state.runtime.backend.replica_id(state.runtime.table, :erlang.term_to_binary(name))

  # A restarted cluster process finds the peers its predecessor knew in the
  # table: each is synced anew when it speaks (its presences stay, and only
  # what changed meanwhile makes diffs), dropped now if its node is gone
  # (no nodedown will come), or after down_period if it stays silent.
  defp adopt_known_replicas(state) do
    now = now()
    connected = MapSet.new(Node.list())

    Enum.reduce(state.runtime.backend.replica_ids(state.runtime.table), state, fn {name, id}, acc ->
      {node, _incarnation} = name = :erlang.binary_to_term(name)

      replica = %{
        id: id,
        status: :syncing,
        seq: 0,
        heard_at: now,
        requested_at: now,
        down_at: nil
      }

      acc = %{acc | replicas: Map.put(acc.replicas, name, replica)}

      if match?({:pubsub, _, _}, acc.transport) or MapSet.member?(connected, node),
        do: acc,
        else: down(acc, name, "its node was gone when this process started")
    end)
  end

  defp put_replica(state, name, changes) do
    %{state | replicas: Map.update!(state.replicas, name, &Map.merge(&1, Map.new(changes)))}
  end

  ## Transport

  defp me(state), do: {node(), state.incarnation}

  # The seq of the last delta taken: a peer behind it lost one.
  defp current_seq(state), do: state.runtime.backend.delta_seq(state.runtime.table)

  defp join(nil, _module), do: nil

  defp join({:pubsub, server}, module) do
    topic = "drab_presence_cluster:" <> inspect(module)
    :ok = Phoenix.PubSub.subscribe(server, topic)
    {:pubsub, server, topic}
  end

  defp join(:pg, module) do
    if Code.ensure_loaded?(:pg) do
      scope = pg_scope(module)
      # By name: OTP 22 has no :pg (the API check keeps us to OTP 22).
      :ok = apply(:pg, :join, [scope, module, self()])
      {:pg, scope, module}
    else
      # OTP 22: :pg2, which pubsub 1.x uses too. By name as well: OTP 23
      # deprecates :pg2, and a call written out warns there, which
      # --warnings-as-errors refuses.
      group = {__MODULE__, module}
      :ok = apply(:pg2, :create, [group])
      :ok = apply(:pg2, :join, [group, self()])
      {:pg2, group}
    end
  end

  defp broadcast(%{transport: transport}, message), do: broadcast(transport, message)

  defp broadcast({:pubsub, server, topic}, message),
    do: Phoenix.PubSub.broadcast_from(server, self(), topic, {@tag, @protocol, message})

  defp broadcast(nil, _message), do: :ok

  defp broadcast(transport, message) do
    for pid <- members(transport), pid != self(), do: send(pid, {@tag, @protocol, message})
    :ok
  end

  # To one peer: straight to its process where it is reachable, else (a
  # PubSub adapter without distribution) to its node through PubSub.
  defp send_to(%{transport: {:pubsub, server, topic}}, {node, _}, pid, message) do
    if is_pid(pid) and node(pid) in Node.list(),
      do: send(pid, {@tag, @protocol, message}),
      else: Phoenix.PubSub.direct_broadcast(node, server, topic, {@tag, @protocol, message})
  end

  defp send_to(_state, _name, pid, message) when is_pid(pid),
    do: send(pid, {@tag, @protocol, message})

  defp send_to(_state, _name, nil, _message), do: :ok

  defp members({:pg, scope, group}), do: apply(:pg, :get_members, [scope, group])
  defp members({:pg2, group}), do: apply(:pg2, :get_members, [group])

  defp quiet_period(state), do: max(state.heartbeat_period, div(state.down_period, 3))

  defp schedule_heartbeat(state), do: Process.send_after(self(), :heartbeat, state.heartbeat_period)

  defp now, do: System.monotonic_time(:millisecond)
end
