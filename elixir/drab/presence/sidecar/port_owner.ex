defmodule Drab.Presence.Sidecar.PortOwner do
  @moduledoc false
  # Owns the sidecar's port: callers write requests to it themselves
  # (`Port.command/2` works from any process), and every reply comes here,
  # where it is routed to the process the request named, by id. This
  # process never waits on a caller, and callers never wait in its queue
  # for a request to go out.
  #
  # Replies arrive in the order the sidecar applied the requests, so this
  # is where the BEAM-side journal and counts are kept (see Handle): from
  # the replies of successful writes, before the caller hears of them. When
  # the sidecar dies (killed, crashed, or it refused a frame it could not
  # skip), this process starts a new one and replays the journal into it,
  # while callers wait for the new port; requests that got no reply are
  # sent again by their callers.
  #
  # Owners to watch or unwatch are gathered and go to each monitor process
  # as one list a millisecond after the first: a burst of tracks costs a
  # monitor one message (and one wake-up) per millisecond, not one per
  # owner. A list keeps the sidecar's order, so a watch and an unwatch of
  # one owner never cross; an owner that dies before it is watched gets
  # its DOWN at once when it is.
  use GenServer
  require Logger

  alias Drab.Presence.Sidecar.{Handle, Wire}
  alias Drab.Presence.Table

  import Bitwise, only: [band: 2]

  @new_owner 1
  @released 1
  @wake 2
  @changed 4

  @replay_batch 2_000
  @watch_delay_ms 1
  @handshake_timeout 10_000

  @track 16
  @untrack 17
  @update 19
  @exit 20
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
    # A port owner that replaces a crashed one goes on from its state in
    # the handle's tables: the dispatcher to wake, and the numbering of the
    # leaves still owed.
    [{:dispatcher, dispatcher}] = :ets.lookup(handle.replication, :dispatcher)

    seq =
      case :ets.last(handle.leaves) do
        :"$end_of_table" -> 0
        last -> last
      end

    state = %{
      handle: handle,
      template: Wire.pid_template(),
      template_node: node(),
      port: nil,
      epoch: epoch,
      dispatcher: dispatcher,
      # Removals are numbered; `delivered` is the number up to which their
      # leaves are known to have been broadcast.
      seq: seq,
      taken: nil,
      outbox_empty?: true,
      # Monitor process => its `{:watch | :unwatch, owner}`, newest first.
      watches: %{}
    }

    case start_sidecar(state) do
      {:ok, state} ->
        # Watches a predecessor gathered and did not send died with it;
        # the journal has their owners.
        if epoch > 0,
          do: for(name <- Tuple.to_list(handle.monitors), do: send(name, :watch_journal))

        {:ok, state}

      {:error, message} ->
        {:stop, message}
    end
  end

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port} = state),
    do: {:noreply, reply(frame, Wire.fresh_template(state))}

  def handle_info(:send_watches, state), do: {:noreply, send_watches(state)}

  def handle_info({port, {:exit_status, status}}, %{port: port} = state),
    do: restart(state, "exited with status #{status}")

  def handle_info({:EXIT, port, reason}, %{port: port} = state),
    do: restart(state, "closed (#{inspect(reason)})")

  def handle_info(_other, state), do: {:noreply, state}

  defp watch(state, owner, change) do
    if state.watches == %{}, do: Process.send_after(self(), :send_watches, @watch_delay_ms)
    monitor = Handle.monitor_for(state.handle, owner)

    %{
      state
      | watches: Map.update(state.watches, monitor, [{change, owner}], &[{change, owner} | &1])
    }
  end

  defp send_watches(state) do
    for {monitor, changes} <- state.watches, do: send(monitor, {:watches, Enum.reverse(changes)})
    %{state | watches: %{}}
  end

  @impl true
  def terminate(_reason, state) do
    Handle.publish(state.handle, state.epoch + 1, nil)
    if state.port, do: close(state.port)
    :ok
  end

  defp restart(state, why) do
    state = state |> Wire.fresh_template() |> send_watches()

    Logger.error("Drab.Presence sidecar #{why}; restarting it and replaying its presences")

    case start_sidecar(%{state | port: nil}) do
      {:ok, state} -> {:noreply, state}
      {:error, message} -> {:stop, message, %{state | port: nil}}
    end
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

    state = %{state | port: port, epoch: epoch, outbox_empty?: true, taken: nil}

    with :ok <- handshake(port),
         :ok <- sync(port, Wire.op(:configure), configuration(state)),
         :ok <- resume_replication(state),
         {:ok, state} <- replay(state) do
      if state.dispatcher, do: set_dispatcher(state)
      Handle.publish(state.handle, epoch, port)
      for name <- Tuple.to_list(state.handle.monitors), do: send(name, :sidecar_ready)
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
    for {{:remote, topic, key}, n} <- :ets.match_object(h.replication, {{:remote, :_, :_}, :_}) do
      count_by(h.counts, topic, key, -n)
    end

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

  # Every presence of a live owner goes back in, with the leave of its old
  # ref owed to subscribers after its new join; presences of owners that
  # died meanwhile, and removals whose leaves were not known delivered,
  # are owed as leaves only.
  defp replay(state) do
    h = state.handle
    {live, dead} = :ets.tab2list(h.journal) |> Enum.split_with(&alive?(state, &1))

    state =
      Enum.reduce(dead, state, fn {{owner, topic, key}, ref, meta}, state ->
        :ets.delete(h.journal, {owner, topic, key})
        uncount(h.counts, topic, key)
        owe_leave(state, topic, key, ref, meta)
      end)

    owed = :ets.tab2list(h.leaves)

    with :ok <- replay_tracks(state, live),
         :ok <- send_leaves(state, owed) do
      # The old refs of the replayed presences are owed too, should this
      # sidecar die before they go out.
      state =
        Enum.reduce(live, state, fn {{_owner, topic, key}, ref, meta}, state ->
          owe_leave(state, topic, key, ref, meta)
        end)

      {:ok, state}
    end
  end

  defp alive?(state, {{owner, _, _}, _, _}),
    do: Process.alive?(Wire.id_pid(state.template, owner))

  defp replay_tracks(state, entries) do
    entries
    |> Enum.chunk_every(@replay_batch)
    |> Enum.reduce_while(:ok, fn batch, :ok ->
      body = [
        <<length(batch)::32>>
        | for {{owner, topic, key}, ref, meta} <- batch do
            [<<owner::64>>, Wire.str(topic), Wire.str(key), <<ref::64>>, Wire.str(meta)]
          end
      ]

      case sync_body(state.port, Wire.op(:replay), body) do
        {:ok, <<_flags, n::32, refs::binary-size(n * 8)>>} ->
          batch
          |> Enum.zip(for <<ref::64 <- refs>>, do: ref)
          |> Enum.each(fn {{k, _old, _meta}, new} ->
            :ets.update_element(state.handle.journal, k, {2, new})
          end)

          {:cont, :ok}

        {:error, _} = error ->
          {:halt, error}
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
        | for {_seq, topic, key, ref, meta} <- batch do
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

  # Writes are journaled (and counted) before their caller hears of them,
  # so a caller that saw :ok finds its presence in any later replay.
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

  defp journal(@track, _to, body, state) do
    <<ref::64, flags, owner::64, tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl),
      meta::binary>> = body

    {topic, key} = {:binary.copy(topic), :binary.copy(key)}
    :ets.insert(state.handle.journal, {{owner, topic, key}, ref, meta})
    count(state.handle.counts, topic, key)

    state = if band(flags, @new_owner) != 0, do: watch(state, owner, :watch), else: state
    wake(flags, state)
  end

  defp journal(@untrack, _to, body, state) do
    <<flags, owner::64, tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl)>> = body

    state =
      if band(flags, @changed) != 0,
        do: remove(state, {owner, topic, key}),
        else: state

    state = if band(flags, @released) != 0, do: watch(state, owner, :unwatch), else: state
    wake(flags, state)
  end

  defp journal(@update, _to, body, state) do
    <<ref::64, flags, owner::64, tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl),
      meta::binary>> = body

    if band(flags, @changed) != 0 do
      {topic, key} = {:binary.copy(topic), :binary.copy(key)}
      k = {owner, topic, key}
      [{_, old_ref, old_meta}] = :ets.lookup(state.handle.journal, k)
      :ets.insert(state.handle.journal, {k, ref, meta})
      state = owe_leave(state, topic, key, old_ref, old_meta)
      wake(flags, state)
    else
      state
    end
  end

  defp journal(@exit, _to, <<flags, owner::64, _removed::64>>, state) do
    h = state.handle
    entries = :ets.select(h.journal, [{{{owner, :_, :_}, :_, :_}, [], [:"$_"]}])

    state =
      Enum.reduce(entries, state, fn {{_, topic, key} = k, ref, meta}, state ->
        :ets.delete(h.journal, k)
        uncount(h.counts, topic, key)
        owe_leave(state, topic, key, ref, meta)
      end)

    wake(flags, state)
  end

  defp journal(@set_dispatcher, to, _body, state) do
    dispatcher = Wire.id_pid(state.template, to)
    :ets.insert(state.handle.replication, {:dispatcher, dispatcher})
    %{state | dispatcher: dispatcher}
  end

  # Removals up to here are in the diffs this take moved to the outbox,
  # unless topics were left pending (those may hold some of them).
  #
  # A take that started this node's delta pending (cluster mode) wakes the
  # replicator, as the NIF does itself.
  defp journal(@take_diffs, _to, <<queued::64, pending::64, delta_started>>, state) do
    taken = if state.outbox_empty? and pending == 0, do: state.seq, else: state.taken

    if delta_started == 1 do
      case :ets.lookup(state.handle.replication, :replicator) do
        [{:replicator, pid}] when is_pid(pid) -> send(pid, :drab_presence_delta)
        _ -> :ok
      end
    end

    %{state | taken: taken, outbox_empty?: queued == 0}
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
    wake(flags, state)
  end

  defp journal(@ack_part, _to, <<empty>>, state) do
    if empty == 1 and state.taken != nil do
      taken = state.taken

      :ets.select_delete(state.handle.leaves, [
        {{:"$1", :_, :_, :_, :_}, [{:"=<", :"$1", taken}], [true]}
      ])
    end

    %{state | outbox_empty?: empty == 1}
  end

  defp journal(_op, _to, _body, state), do: state

  defp remove(state, k) do
    h = state.handle

    case :ets.lookup(h.journal, k) do
      [{{_, topic, key}, ref, meta}] ->
        :ets.delete(h.journal, k)
        uncount(h.counts, topic, key)
        owe_leave(state, topic, key, ref, meta)

      [] ->
        state
    end
  end

  defp owe_leave(state, topic, key, ref, meta) do
    seq = state.seq + 1
    :ets.insert(state.handle.leaves, {seq, topic, key, ref, meta})
    %{state | seq: seq}
  end

  defp wake(flags, state) do
    if band(flags, @wake) != 0 and state.dispatcher,
      do: send(state.dispatcher, :drab_presence_pending)

    state
  end

  # Users are the strings keys are listed under: `42` and `"42"` are two
  # presences of one user (a non-binary key is stored tagged with its
  # string, see presence_core's key.rs).
  defp count(counts, topic, key) do
    key = Table.listed_key(key)

    users = if :ets.update_counter(counts, {topic, key}, 1, {{topic, key}, 0}) == 1, do: 1, else: 0
    :ets.update_counter(counts, topic, [{2, users}, {3, 1}], {topic, 0, 0})
  end

  defp uncount(counts, topic, key) do
    key = Table.listed_key(key)

    users =
      case :ets.update_counter(counts, {topic, key}, -1) do
        0 ->
          :ets.delete(counts, {topic, key})
          1

        _ ->
          0
      end

    case :ets.update_counter(counts, topic, [{2, -users}, {3, -1}]) do
      [_, 0] -> :ets.delete(counts, topic)
      _ -> :ok
    end
  end

  defp count_changes(_handle, 0, <<>>), do: :ok

  defp count_changes(
         h,
         n,
         <<tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl), change::signed-64,
           rest::binary>>
       ) do
    {topic, key} = {:binary.copy(topic), :binary.copy(key)}
    count_by(h.counts, topic, key, change)

    if :ets.update_counter(h.replication, {:remote, topic, key}, change, {{:remote, topic, key}, 0}) ==
         0,
       do: :ets.delete(h.replication, {:remote, topic, key})

    count_changes(h, n - 1, rest)
  end

  # `change` presences more (or fewer) under one key at once.
  defp count_by(counts, topic, key, change) do
    key = Table.listed_key(key)
    now = :ets.update_counter(counts, {topic, key}, change, {{topic, key}, 0})

    users =
      cond do
        now == 0 ->
          :ets.delete(counts, {topic, key})
          -1

        now == change ->
          1

        true ->
          0
      end

    case :ets.update_counter(counts, topic, [{2, users}, {3, change}], {topic, 0, 0}) do
      [_, 0] -> :ets.delete(counts, topic)
      _ -> :ok
    end
  end

  defp close(port) do
    Port.close(port)
  rescue
    # Already closed: the sidecar exited first.
    ArgumentError -> :ok
  end
end
