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
  #
  # This process decides when; the work is elsewhere: Lifecycle opens,
  # greets, configures and closes a sidecar; Recovery replays, pauses and
  # repairs; Journal records what replies tell the BEAM side.
  use GenServer
  require Logger

  alias Drab.Presence.Sidecar.{Journal, Lifecycle, Recovery, Table, Wire}
  alias Drab.Presence.Telemetry
  require Wire

  # How often locks are checked for writers killed holding them.
  @sweep_ms 1_000

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
    {:noreply, Recovery.repair_locks(state)}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state),
    do: restart(state, "exited with status #{status}")

  def handle_info({:EXIT, port, reason}, %{port: port} = state),
    do: restart(state, "closed (#{inspect(reason)})")

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Table.publish(state.table, state.epoch + 1, nil)
    if state.port, do: Lifecycle.close(state.port)
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

  # A new sidecar, configured, replayed and published; writers wait from
  # the first publish (nil) to the last.
  defp start_sidecar(state) do
    epoch = state.epoch + 1
    Table.publish(state.table, epoch, nil)

    with {:ok, port} <- Lifecycle.open(state.table) do
      state = %{state | port: port, epoch: epoch}

      with :ok <- Recovery.resume_replication(state),
           :ok <- Recovery.quiesce(state.table),
           :ok <- Recovery.replay(state) do
        # Locks of writers killed mid-write: the replay and the recount did
        # what a repair would (their watches went before they wrote).
        Recovery.drop_dead_locks(state.table)
        Journal.recount(state.table)
        if state.dispatcher, do: Recovery.set_dispatcher(state)
        Table.publish(state.table, epoch, port)
        Recovery.replicas_lost(state)
        {:ok, state}
      else
        {:error, message} ->
          Lifecycle.close(port)
          {:error, message}
      end
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
    state = if status == Wire.status(:ok), do: Journal.record(op, to, body, state), else: state

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
end
