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

  alias Drab.Presence.Sidecar.{Handle, Wire, Writes}
  alias Drab.Presence.Telemetry

  import Bitwise, only: [band: 2]

  @wake 2

  @replay_batch 2_000
  @handshake_timeout 10_000
  # How often locks are checked for writers killed holding them, and how
  # long a pause waits for live writers to let go.
  @sweep_ms 1_000
  @quiesce_ms 5_000

  @wake_op 4
  @take_diffs 24
  @ack_part 26
  @set_dispatcher 3
  @take_delta 42
  @apply_delta 44
  @forget_replica 47

  @doc false
  @spec child_spec({Handle.t(), keyword()}) :: Supervisor.child_spec()
  def child_spec({handle, opts}) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [handle, opts]}}
  end

  @doc false
  @spec start_link(Handle.t(), keyword()) :: GenServer.on_start()
  def start_link(handle, opts) do
    GenServer.start_link(__MODULE__, {handle, opts}, name: handle.owner)
  end

  @impl true
  def init({handle, _opts}) do
    Process.flag(:trap_exit, true)
    {epoch, _} = Handle.current(handle)
    # A port owner that replaces a crashed one finds the dispatcher to wake
    # in the handle's table.
    [{:dispatcher, dispatcher}] = :ets.lookup(handle.replication, :dispatcher)

    state = %{
      handle: handle,
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
    Handle.publish(state.handle, state.epoch + 1, nil)
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

  defp restarted(%{handle: h}, why, started_at) do
    Telemetry.execute(
      [:sidecar, :restart],
      %{
        presences: :ets.info(h.journal, :size),
        duration_ms:
          System.convert_time_unit(System.monotonic_time() - started_at, :native, :microsecond) /
            1_000
      },
      %{module: h.module, reason: why}
    )
  end

  ## Starting and replaying

  defp start_sidecar(state) do
    epoch = state.epoch + 1
    Handle.publish(state.handle, epoch, nil)

    port =
      Port.open({:spawn_executable, state.handle.path}, [
        :binary,
        {:packet, 4},
        :exit_status,
        :use_stdio
      ])

    state = %{state | port: port, epoch: epoch}

    with :ok <- handshake(port),
         :ok <- sync(port, Wire.op(:configure), configuration(state)),
         :ok <- resume_replication(state),
         :ok <- quiesce(state.handle),
         :ok <- replay(state) do
      # Locks of writers killed mid-write: the replay and the recount did
      # what a repair would (their watches went before they wrote).
      drop_dead_locks(state.handle)
      recount(state.handle)
      if state.dispatcher, do: set_dispatcher(state)
      Handle.publish(state.handle, epoch, port)
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
  defp resume_replication(%{handle: h} = state) do
    :ets.match_delete(h.replication, {{:remote, :_, :_}, :_})

    case :ets.lookup(h.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) ->
        seq = :ets.update_counter(h.replication, :seq, 1)
        sync(state.port, Wire.op(:set_replicator), <<1, seq::64>>)

      _ ->
        :ok
    end
  end

  defp replicas_lost(%{handle: h, epoch: epoch}) do
    case :ets.lookup(h.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) and epoch > 1 -> send(pid, :drab_presence_replicas_lost)
      _ -> :ok
    end
  end

  defp configuration(%{handle: %{max_meta: settings}}),
    do: <<:atomics.get(settings, 1)::64, :atomics.get(settings, 2)::8>>

  defp handshake(port) do
    case sync(port, Wire.op(:hello), ["DRPS", <<Wire.version()::16>>]) do
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
  defp sync(port, op, body) do
    with {:ok, _body} <- sync_body(port, op, body), do: :ok
  end

  defp sync_body(port, op, body) do
    id = :erlang.unique_integer([:positive])
    Port.command(port, [<<op, id::64, 0::64>> | List.wrap(body)])

    receive do
      {^port, {:data, <<^op, ^id::64, 0::64, 0, rest::binary>>}} ->
        {:ok, rest}

      {^port, {:data, <<_op, _id::64, _::64, status, message::binary>>}} when status in [6, 8] ->
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
  defp quiesce(h, since \\ System.monotonic_time(:millisecond), said? \\ false) do
    if Enum.all?(:ets.tab2list(h.locks), fn {_owner, writer} -> not Process.alive?(writer) end) do
      :ok
    else
      waited = System.monotonic_time(:millisecond) - since
      say? = waited > @quiesce_ms and not said?

      if say?,
        do: Logger.error("Drab.Presence sidecar: writers still hold locks after #{waited} ms")

      Process.sleep(1)
      quiesce(h, since, said? or say?)
    end
  end

  defp drop_dead_locks(h) do
    for {_owner, writer} = lock <- :ets.tab2list(h.locks),
        not Process.alive?(writer),
        do: :ets.delete_object(h.locks, lock)
  end

  # Counts from the journal and the replicated presences, written while
  # no writer runs: what a killed writer may have left half counted is
  # counted again.
  defp recount(h) do
    :ets.delete_all_objects(h.counts)

    for {{_owner, topic, key}, _ref, _meta, _prev} <- :ets.tab2list(h.journal) do
      Writes.count(h.counts, topic, key, 1)
    end

    for {{:remote, topic, key}, n} <- :ets.match_object(h.replication, {{:remote, :_, :_}, :_}) do
      Writes.count(h.counts, topic, key, n)
    end

    :ok
  end

  # Owners whose writer was killed holding their lock: writes pause, each
  # such owner's presences are resynced into the sidecar under new refs
  # (the old ones leave), or removed if the owner is gone, and everything
  # is counted again.
  defp repair_locks(%{port: nil} = state), do: state

  defp repair_locks(state) do
    h = state.handle
    dead = for {owner, writer} <- :ets.tab2list(h.locks), not Process.alive?(writer), do: owner

    if dead != [] do
      Handle.publish(h, state.epoch, nil)
      :ok = quiesce(h)
      Enum.each(dead, &resync_owner(state, &1))
      recount(h)
      Handle.publish(h, state.epoch, state.port)

      Logger.error(
        "Drab.Presence sidecar: resynced #{length(dead)} owner(s) whose writer was killed mid-write"
      )

      Telemetry.execute([:sidecar, :resync], %{owners: length(dead)}, %{module: h.module})
    end

    state
  end

  defp resync_owner(state, owner) do
    h = state.handle
    pid = Wire.id_pid(state.template, owner)
    rows = Writes.owner_rows(h, owner)
    old_refs = for {_, ref, _, _} <- rows, do: ref

    tracks =
      if Process.alive?(pid) do
        for {{_, topic, key} = row, old, meta, _prev} <- rows do
          ref = Writes.new_ref(h)
          :ets.insert(h.leaves, {old, topic, key, meta})
          :ets.insert(h.journal, {row, ref, meta, nil})
          Writes.track_frame(owner, topic, key, ref, meta)
        end
      else
        Writes.drop_rows(h, owner)
        []
      end

    if tracks != [], do: Writes.notify(Handle.monitor_for(h, owner), {:watch, owner})

    exit = Writes.exit_frame([{owner, old_refs}])

    # One frame per command: the port adds each one's length prefix.
    Enum.each([exit | tracks], &Port.command(state.port, &1))
    :ets.delete(h.locks, owner)
  rescue
    # The port closed under us: the restart replays the journal.
    ArgumentError -> :ets.delete(state.handle.locks, owner)
  end

  # Every presence of a live owner goes back in under a new ref, with the
  # leave of its old ref owed to subscribers after its new join; presences
  # of owners that died meanwhile, and removals whose leaves were not known
  # delivered, are owed as leaves only.
  defp replay(state) do
    h = state.handle
    {live, dead} = :ets.tab2list(h.journal) |> Enum.split_with(&alive?(state, &1))

    for {{_owner, topic, key} = row, ref, meta, _prev} <- dead do
      :ets.delete(h.journal, row)
      :ets.insert(h.leaves, {ref, topic, key, meta})
    end

    owed = :ets.tab2list(h.leaves)

    replayed =
      for {row, old, meta, _prev} <- live do
        ref = Writes.new_ref(h)
        :ets.insert(h.journal, {row, ref, meta, nil})
        {row, old, ref, meta}
      end

    with :ok <- replay_tracks(state, replayed),
         :ok <- send_leaves(state, owed) do
      # The old refs of the replayed presences are owed too, should this
      # sidecar die before they go out.
      for {{_owner, topic, key}, old, _ref, meta} <- replayed,
          do: :ets.insert(h.leaves, {old, topic, key, meta})

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

      case sync(state.port, Wire.op(:replay), body) do
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

      case sync_body(state.port, Wire.op(:recovery_leaves), body) do
        {:ok, _} -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
  end

  defp set_dispatcher(state) do
    id = Wire.pid_id(state.dispatcher)

    case sync_body(state.port, @set_dispatcher, <<id::64>>) do
      {:ok, <<1>>} -> send(state.dispatcher, :drab_presence_pending)
      _ -> :ok
    end
  end

  ## Replies

  defp reply(<<@wake_op, 0::64, 0::64, 0>>, state) do
    if state.dispatcher, do: send(state.dispatcher, :drab_presence_pending)
    state
  end

  defp reply(<<_op, _id::64, _to::64, 6, message::binary>>, state) do
    # The answer to a frame the sidecar could not read: its ids may be
    # garbage too, so it goes nowhere but the log.
    Logger.error("Drab.Presence sidecar refused a frame: #{inspect(message, limit: 200)}")
    state
  end

  defp reply(<<op, id::64, to::64, status, body::binary>> = frame, state) do
    state = if status == 0, do: journal(op, to, body, state), else: state

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

  defp journal(@set_dispatcher, to, _body, state) do
    dispatcher = Wire.id_pid(state.template, to)
    :ets.insert(state.handle.replication, {:dispatcher, dispatcher})
    %{state | dispatcher: dispatcher}
  end

  # A take that started this node's delta pending (cluster mode) wakes the
  # replicator, as the NIF does itself.
  defp journal(
         @take_diffs,
         _to,
         <<_queued::64, _pending::64, delta_started, delivered::binary>>,
         state
       ) do
    delivered(state.handle, delivered)

    if delta_started == 1 do
      case :ets.lookup(state.handle.replication, :replicator) do
        [{:replicator, pid}] when is_pid(pid) -> send(pid, :drab_presence_delta)
        _ -> :ok
      end
    end

    state
  end

  # The last seq handed out, for a restarted sidecar to go on from.
  defp journal(@take_delta, _to, <<1, seq::64, _delta::binary>>, state) do
    :ets.insert(state.handle.replication, {:seq, seq})
    state
  end

  # Replicated presences joined or left: counted as local ones are, and
  # remembered, to be uncounted should the sidecar die with them.
  defp journal(op, _to, <<flags, _dropped::64, n::32, changes::binary>>, state)
       when op in @apply_delta..@forget_replica do
    count_changes(state.handle, n, changes)

    if band(flags, @wake) != 0 and state.dispatcher,
      do: send(state.dispatcher, :drab_presence_pending)

    state
  end

  defp journal(@ack_part, _to, <<_empty, delivered::binary>>, state) do
    delivered(state.handle, delivered)
    state
  end

  defp journal(_op, _to, _body, state), do: state

  # Removals whose leaves subscribers have had (or never needed): a
  # restarted sidecar owes them no more.
  # A size checked in a guard, not written as binary-size(n * 8): Elixir
  # takes an expression as a size in a pattern from 1.14 on.
  defp delivered(h, <<n::32, refs::binary>>) when byte_size(refs) == n * 8 do
    for <<ref::64 <- refs>>, do: :ets.delete(h.leaves, ref)
    :ok
  end

  defp count_changes(_handle, 0, <<>>), do: :ok

  defp count_changes(
         h,
         n,
         <<tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl), change::signed-64,
           rest::binary>>
       ) do
    {topic, key} = {:binary.copy(topic), :binary.copy(key)}
    Writes.count(h.counts, topic, key, change)

    if :ets.update_counter(h.replication, {:remote, topic, key}, change, {{:remote, topic, key}, 0}) ==
         0,
       do: :ets.delete(h.replication, {:remote, topic, key})

    count_changes(h, n - 1, rest)
  end

  defp close(port) do
    Port.close(port)
  rescue
    # Already closed: the sidecar exited first.
    ArgumentError -> :ok
  end
end
