defmodule Drab.Presence.Sidecar.PortOwner do
  @moduledoc false
  # Owns the sidecar's port: callers write requests to it themselves
  # (`Port.command/2` works from any process), and every reply comes here,
  # where it is routed to the process the request named, by id. This
  # process never waits on a caller, and callers never wait in its queue
  # for a request to go out.
  #
  # Local writes are decided and journaled by their callers (see Writes)
  # and not answered. What comes here besides replies: `Wake` when a diff
  # became pending (the dispatcher is told), the refs of removals whose
  # leaves the sidecar says are delivered (they are owed no more), and the
  # count changes of replicated presences (cluster mode).
  #
  # When the sidecar dies (killed, crashed, or it refused a frame it could
  # not skip), this process starts a new one, waits until no writer holds
  # a lock (writers wait for the new port before they take one), and
  # replays the journal into it; requests that got no reply are sent again
  # by their callers. The same pause repairs an owner whose writer was
  # killed holding its lock: its presences are resynced and the counts
  # recomputed from the journal.
  use GenServer
  require Logger

  alias Drab.Presence.Sidecar.{Table, Wire, Writes}
  alias Drab.Presence.Telemetry
  require Wire

  @replay_batch 2_000
  @handshake_timeout 10_000
  # How often locks are checked for writers killed holding them, and how
  # long a pause waits for live writers to let go.
  @sweep_ms 1_000
  @quiesce_ms 5_000

  @doc false
  @spec child_spec({Table.t(), keyword()}) :: Supervisor.child_spec()
  def child_spec({table, opts}) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [table, opts]}}
  end

  @doc false
  @spec start_link(Table.t(), keyword()) :: GenServer.on_start()
  def start_link(table, opts) do
    GenServer.start_link(__MODULE__, {table, opts}, name: table.port_owner)
  end

  @impl true
  def init({table, _opts}) do
    Process.flag(:trap_exit, true)
    {epoch, _} = Table.current(table)
    # A port owner that replaces a crashed one finds the dispatcher to wake
    # in the table's `replication` ETS table.
    [{:dispatcher, dispatcher}] = :ets.lookup(table.replication, :dispatcher)

    state = %{
      table: table,
      template: Wire.pid_template(),
      template_node: node(),
      port: nil,
      epoch: epoch,
      dispatcher: dispatcher
    }

    started_at = System.monotonic_time()

    case start_sidecar(state) do
      {:ok, state} ->
        # A port owner that replaces a crashed one has started a new
        # sidecar and replayed it.
        if epoch > 0, do: restarted(state, "its port owner restarted", started_at)
        Process.send_after(self(), :sweep_locks, @sweep_ms)
        {:ok, state}

      {:error, message} ->
        {:stop, message}
    end
  end

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port} = state),
    do: {:noreply, reply(frame, Wire.fresh_template(state))}

  def handle_info(:sweep_locks, state) do
    # A writer that asks comes on top of the timer's sweeps; one in the
    # mailbox is enough.
    receive do
      :sweep_locks -> :ok
    after
      0 -> :ok
    end

    Process.send_after(self(), :sweep_locks, @sweep_ms)
    {:noreply, repair_locks(state)}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state),
    do: restart(state, "exited with status #{status}")

  def handle_info({:EXIT, port, reason}, %{port: port} = state),
    do: restart(state, "closed (#{inspect(reason)})")

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Table.publish(state.table, state.epoch + 1, nil)
    if state.port, do: close(state.port)
    :ok
  end

  defp restart(state, why) do
    state = Wire.fresh_template(state)

    Logger.error("Drab.Presence sidecar #{why}; restarting it and replaying its presences")
    started_at = System.monotonic_time()

    case start_sidecar(%{state | port: nil}) do
      {:ok, state} ->
        restarted(state, why, started_at)
        {:noreply, state}

      {:error, message} ->
        {:stop, message, %{state | port: nil}}
    end
  end

  defp restarted(%{table: table}, why, started_at) do
    Telemetry.execute(
      [:sidecar, :restart],
      %{
        presences: :ets.info(table.journal, :size),
        duration_ms:
          System.convert_time_unit(System.monotonic_time() - started_at, :native, :microsecond) /
            1_000
      },
      %{module: table.module, reason: why}
    )
  end

  ## Starting and replaying

  defp start_sidecar(state) do
    epoch = state.epoch + 1
    Table.publish(state.table, epoch, nil)

    port =
      Port.open({:spawn_executable, state.table.path}, [
        :binary,
        {:packet, 4},
        :exit_status,
        :use_stdio
      ])

    state = %{state | port: port, epoch: epoch}

    with :ok <- handshake(port),
         :ok <- sync(port, :configure, Wire.configure_body(Table.settings(state.table))),
         :ok <- resume_replication(state),
         :ok <- quiesce(state.table),
         :ok <- replay(state) do
      # Locks of writers killed mid-write: the replay and the recount did
      # what a repair would (their watches went before they wrote).
      drop_dead_locks(state.table)
      recount(state.table)
      if state.dispatcher, do: set_dispatcher(state)
      Table.publish(state.table, epoch, port)
      replicas_lost(state)
      {:ok, state}
    else
      {:error, message} ->
        close(port)
        {:error, message}
    end
  end

  # Cluster mode across a sidecar's death. Its replicas of other nodes died
  # with it: their counts go, and the replicator resyncs every peer once
  # the new sidecar is up. This node's own numbering goes on past the last
  # delta handed out, skipping one: peers see a gap (or a heartbeat ahead
  # of what they applied) and resync this node's full state, which holds
  # the replayed presences under their new refs.
  defp resume_replication(%{table: table} = state) do
    :ets.match_delete(table.replication, {{:remote, :_, :_}, :_})

    case :ets.lookup(table.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) ->
        seq = :ets.update_counter(table.replication, :seq, 1)
        sync(state.port, :set_replicator, <<1, seq::64>>)

      _ ->
        :ok
    end
  end

  defp replicas_lost(%{table: table, epoch: epoch}) do
    case :ets.lookup(table.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) and epoch > 1 -> send(pid, :drab_presence_replicas_lost)
      _ -> :ok
    end
  end

  defp handshake(port) do
    case sync(port, :hello, ["DRPS", <<Wire.version()::16>>]) do
      :ok ->
        :ok

      {:error, message} ->
        {:error,
         "the presence sidecar (#{state_path(port)}) did not accept protocol version " <>
           "#{Wire.version()}: #{message}"}
    end
  end

  defp state_path(port) do
    case Port.info(port, :os_pid) do
      {:os_pid, os_pid} -> "OS pid #{os_pid}"
      nil -> inspect(port)
    end
  end

  # A request of the port owner's own, answered before anything else moves:
  # `:ok` (`sync/3`) or `{:ok, body}`, or `{:error, message}`.
  defp sync(port, name, body) do
    with {:ok, _body} <- sync_body(port, name, body), do: :ok
  end

  defp sync_body(port, name, body) do
    op = Wire.op(name)
    id = :erlang.unique_integer([:positive])
    Port.command(port, Wire.request(name, id, 0, body))

    receive do
      {^port, {:data, <<^op, ^id::64, 0::64, Wire.status(:ok), rest::binary>>}} ->
        {:ok, rest}

      {^port, {:data, <<_op, _id::64, _::64, status, message::binary>>}}
      when status in [Wire.status(:bad_frame), Wire.status(:refused)] ->
        {:error, message}

      {^port, {:exit_status, status}} ->
        {:error, "the sidecar exited with status #{status}"}
    after
      @handshake_timeout -> {:error, "no answer from the sidecar in #{@handshake_timeout} ms"}
    end
  end

  ## Pauses: no writer may be half way while the journal is read whole

  # Writers take their owner's lock only while the port is published, and
  # let go when they find it is not: once no live process holds a lock,
  # every decided write is in the journal, and none is on its way.
  # Going on while a live writer is half way would lose its write: this
  # waits as long as it takes (a writer gives up a lock it cannot use in
  # Writes' own time limit), saying so now and then.
  defp quiesce(table, since \\ System.monotonic_time(:millisecond), said? \\ false) do
    if Enum.all?(:ets.tab2list(table.locks), fn {_owner, writer} -> not Process.alive?(writer) end) do
      :ok
    else
      waited = System.monotonic_time(:millisecond) - since
      say? = waited > @quiesce_ms and not said?

      if say?,
        do: Logger.error("Drab.Presence sidecar: writers still hold locks after #{waited} ms")

      Process.sleep(1)
      quiesce(table, since, said? or say?)
    end
  end

  defp drop_dead_locks(table) do
    for {_owner, writer} = lock <- :ets.tab2list(table.locks),
        not Process.alive?(writer),
        do: :ets.delete_object(table.locks, lock)
  end

  # Counts from the journal and the replicated presences, written while
  # no writer runs: what a killed writer may have left half counted is
  # counted again.
  defp recount(table) do
    :ets.delete_all_objects(table.counts)

    for {{_owner, topic, key}, _ref, _meta, _prev} <- :ets.tab2list(table.journal) do
      Writes.count(table.counts, topic, key, 1)
    end

    for {{:remote, topic, key}, n} <- :ets.match_object(table.replication, {{:remote, :_, :_}, :_}) do
      Writes.count(table.counts, topic, key, n)
    end

    :ok
  end

  # Owners whose writer was killed holding their lock: writes pause, each
  # such owner's presences are resynced into the sidecar under new refs
  # (the old ones leave), or removed if the owner is gone, and everything
  # is counted again.
  defp repair_locks(%{port: nil} = state), do: state

  defp repair_locks(state) do
    table = state.table
    dead = for {owner, writer} <- :ets.tab2list(table.locks), not Process.alive?(writer), do: owner

    if dead != [] do
      Table.publish(table, state.epoch, nil)
      :ok = quiesce(table)
      Enum.each(dead, &resync_owner(state, &1))
      recount(table)
      Table.publish(table, state.epoch, state.port)

      Logger.error(
        "Drab.Presence sidecar: resynced #{length(dead)} owner(s) whose writer was killed mid-write"
      )

      Telemetry.execute([:sidecar, :resync], %{owners: length(dead)}, %{module: table.module})
    end

    state
  end

  defp resync_owner(state, owner) do
    table = state.table
    pid = Wire.id_pid(state.template, owner)
    rows = Writes.owner_rows(table, owner)
    old_refs = for {_, ref, _, _} <- rows, do: ref

    tracks =
      if Process.alive?(pid) do
        for {{_, topic, key} = row, old, meta, _prev} <- rows do
          ref = Writes.new_ref(table)
          :ets.insert(table.leaves, {old, topic, key, meta})
          :ets.insert(table.journal, {row, ref, meta, nil})
          Wire.track_frame(owner, topic, key, ref, meta)
        end
      else
        Writes.drop_rows(table, owner)
        []
      end

    if tracks != [], do: Writes.notify(Table.monitor_for(table, owner), {:watch, owner})

    exit = Wire.exit_frame([{owner, old_refs}])

    # One frame per command: the port adds each one's length prefix.
    Enum.each([exit | tracks], &Port.command(state.port, &1))
    :ets.delete(table.locks, owner)
  rescue
    # The port closed under us: the restart replays the journal.
    ArgumentError -> :ets.delete(state.table.locks, owner)
  end

  # Every presence of a live owner goes back in under a new ref, with the
  # leave of its old ref owed to subscribers after its new join; presences
  # of owners that died meanwhile, and removals whose leaves were not known
  # delivered, are owed as leaves only.
  defp replay(state) do
    table = state.table
    {live, dead} = :ets.tab2list(table.journal) |> Enum.split_with(&alive?(state, &1))

    for {{_owner, topic, key} = row, ref, meta, _prev} <- dead do
      :ets.delete(table.journal, row)
      :ets.insert(table.leaves, {ref, topic, key, meta})
    end

    owed = :ets.tab2list(table.leaves)

    replayed =
      for {row, old, meta, _prev} <- live do
        ref = Writes.new_ref(table)
        :ets.insert(table.journal, {row, ref, meta, nil})
        {row, old, ref, meta}
      end

    with :ok <- replay_tracks(state, replayed),
         :ok <- send_leaves(state, owed) do
      # The old refs of the replayed presences are owed too, should this
      # sidecar die before they go out.
      for {{_owner, topic, key}, old, _ref, meta} <- replayed,
          do: :ets.insert(table.leaves, {old, topic, key, meta})

      :ok
    end
  end

  defp alive?(state, {{owner, _, _}, _, _, _}),
    do: Process.alive?(Wire.id_pid(state.template, owner))

  defp replay_tracks(state, entries) do
    entries
    |> Enum.chunk_every(@replay_batch)
    |> Enum.reduce_while(:ok, fn batch, :ok ->
      body = [
        <<length(batch)::32>>
        | for {{owner, topic, key}, old, ref, meta} <- batch do
            [<<owner::64>>, Wire.str(topic), Wire.str(key), <<old::64, ref::64>>, Wire.str(meta)]
          end
      ]

      case sync(state.port, :replay, body) do
        :ok -> {:cont, :ok}
        {:error, _} = error -> {:halt, error}
      end
    end)
  end

  defp send_leaves(_state, []), do: :ok

  defp send_leaves(state, owed) do
    owed
    |> Enum.chunk_every(@replay_batch)
    |> Enum.reduce_while(:ok, fn batch, :ok ->
      body = [
        <<length(batch)::32>>
        | for {ref, topic, key, meta} <- batch do
            [Wire.str(topic), Wire.str(key), <<ref::64>>, Wire.str(meta)]
          end
      ]

      case sync_body(state.port, :recovery_leaves, body) do
        {:ok, _} -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
  end

  defp set_dispatcher(state) do
    id = Wire.pid_id(state.dispatcher)

    case sync_body(state.port, :set_dispatcher, <<id::64>>) do
      {:ok, <<1>>} -> send(state.dispatcher, :drab_presence_pending)
      _ -> :ok
    end
  end

  ## Replies

  defp reply(<<Wire.op(:wake), 0::64, 0::64, Wire.status(:ok)>>, state) do
    if state.dispatcher, do: send(state.dispatcher, :drab_presence_pending)
    state
  end

  defp reply(<<_op, _id::64, _to::64, Wire.status(:bad_frame), message::binary>>, state) do
    # The answer to a frame the sidecar could not read: its ids may be
    # garbage too, so it goes nowhere but the log.
    Logger.error("Drab.Presence sidecar refused a frame: #{inspect(message, limit: 200)}")
    state
  end

  defp reply(<<op, id::64, to::64, status, body::binary>> = frame, state) do
    state = if status == Wire.status(:ok), do: journal(op, to, body, state), else: state

    if to != 0 do
      send(Wire.id_pid(state.template, to), {:drab_presence_reply, id, status, body})
    end

    state
  rescue
    # Never from our sidecar; but a reply we cannot read must not take the
    # journal down with this process.
    error in [ArgumentError, MatchError, CaseClauseError] ->
      Logger.error(
        "Drab.Presence sidecar sent a reply that could not be handled " <>
          "(#{Exception.message(error)}): #{inspect(frame, limit: 32)}"
      )

      state
  end

  defp reply(frame, state) do
    Logger.error("Drab.Presence sidecar sent an unreadable reply: #{inspect(frame, limit: 32)}")
    state
  end

  defp journal(Wire.op(:set_dispatcher), to, _body, state) do
    dispatcher = Wire.id_pid(state.template, to)
    :ets.insert(state.table.replication, {:dispatcher, dispatcher})
    %{state | dispatcher: dispatcher}
  end

  # A take that started this node's delta pending (cluster mode) wakes the
  # replicator, as the NIF does itself.
  defp journal(
         Wire.op(:take_diffs),
         _to,
         <<_queued::64, _pending::64, delta_started, delivered::binary>>,
         state
       ) do
    delivered(state.table, delivered)

    if delta_started == 1 do
      case :ets.lookup(state.table.replication, :replicator) do
        [{:replicator, pid}] when is_pid(pid) -> send(pid, :drab_presence_delta)
        _ -> :ok
      end
    end

    state
  end

  # The last seq handed out, for a restarted sidecar to go on from.
  defp journal(Wire.op(:take_delta), _to, <<1, seq::64, _delta::binary>>, state) do
    :ets.insert(state.table.replication, {:seq, seq})
    state
  end

  # Replicated presences joined or left: counted as local ones are, and
  # remembered, to be uncounted should the sidecar die with them.
  defp journal(op, _to, <<flags, _dropped::64, n::32, changes::binary>>, state)
       when op in [
              Wire.op(:apply_delta),
              Wire.op(:sync_replica),
              Wire.op(:drop_replica),
              Wire.op(:forget_replica)
            ] do
    count_changes(state.table, n, changes)

    if Wire.wake?(flags) and state.dispatcher,
      do: send(state.dispatcher, :drab_presence_pending)

    state
  end

  defp journal(Wire.op(:ack_part), _to, <<_empty, delivered::binary>>, state) do
    delivered(state.table, delivered)
    state
  end

  defp journal(_op, _to, _body, state), do: state

  # Removals whose leaves subscribers have had (or never needed): a
  # restarted sidecar owes them no more.
  # A size checked in a guard, not written as binary-size(n * 8): Elixir
  # takes an expression as a size in a pattern from 1.14 on.
  defp delivered(table, <<n::32, refs::binary>>) when byte_size(refs) == n * 8 do
    for <<ref::64 <- refs>>, do: :ets.delete(table.leaves, ref)
    :ok
  end

  defp count_changes(_table, 0, <<>>), do: :ok

  defp count_changes(
         table,
         n,
         <<tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl), change::signed-64,
           rest::binary>>
       ) do
    {topic, key} = {:binary.copy(topic), :binary.copy(key)}
    Writes.count(table.counts, topic, key, change)

    if :ets.update_counter(
         table.replication,
         {:remote, topic, key},
         change,
         {{:remote, topic, key}, 0}
       ) ==
         0,
       do: :ets.delete(table.replication, {:remote, topic, key})

    count_changes(table, n - 1, rest)
  end

  defp close(port) do
    Port.close(port)
  rescue
    # Already closed: the sidecar exited first.
    ArgumentError -> :ok
  end
end
