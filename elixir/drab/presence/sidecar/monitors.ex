defmodule Drab.Presence.Sidecar.Monitors do
  @moduledoc false
  # One of a small pool of processes that monitor the owners of a sidecar
  # table (the sidecar cannot monitor a pid). Owners are spread over the
  # pool by hash: no process per presence, and no single process taking
  # every DOWN of a mass disconnect.
  #
  # A writer sends `{:watch, owner}` when the owner's first presence is
  # journaled, and `{:unwatch, owner}` when its last one goes. Watches and
  # unwatches of one owner come from different processes and may cross, so
  # an unwatch lets the owner go only if, under the owner's lock, it still
  # has no presence: a track writes its row before it lets the lock go. On DOWN, this process removes the
  # owner's presences, with those of the other DOWNs queued by then, in one
  # burst (see Writes.exit_owners/2).
  use GenServer

  alias Drab.Presence.Sidecar.{Table, Wire, Writes}

  # The most DOWNs taken in one burst.
  @burst 500

  @doc false
  @spec child_spec({Table.t(), non_neg_integer()}) :: Supervisor.child_spec()
  def child_spec({table, index}) do
    %{id: {__MODULE__, index}, start: {__MODULE__, :start_link, [table, index]}}
  end

  @doc false
  @spec start_link(Table.t(), non_neg_integer()) :: GenServer.on_start()
  def start_link(table, index) do
    GenServer.start_link(__MODULE__, {table, index}, name: elem(table.monitors, index))
  end

  @impl true
  def init({table, index}) do
    state = %{
      table: table,
      name: elem(table.monitors, index),
      template: Wire.pid_template(),
      template_node: node(),
      monitors: %{},
      # Owners gone, newest first, to tell the sidecar of in one burst.
      exiting: [],
      exiting_count: 0,
      flush_sent?: false
    }

    # A restarted monitor takes over the owners the journal holds: its
    # predecessor's monitors died with it.
    {:ok, watch_journal(state)}
  end

  defp watch_journal(state) do
    :ets.select(state.table.journal, [{{{:"$1", :_, :_}, :_, :_, :_}, [], [:"$1"]}])
    |> Enum.dedup()
    |> Enum.filter(&(Table.monitor_for(state.table, &1) == state.name))
    |> Enum.reduce(Wire.fresh_template(state), &watch/2)
  end

  @impl true
  def handle_info({:watch, owner}, state),
    do: {:noreply, watch(owner, Wire.fresh_template(state))}

  def handle_info({:unwatch, owner}, state) do
    table = state.table

    with {ref, monitors} when ref != nil <- Map.pop(state.monitors, owner),
         false <- Writes.locked(table, owner, fn -> Writes.has_presences?(table, owner) end) do
      Process.demonitor(ref, [:flush])
      {:noreply, %{state | monitors: monitors}}
    else
      _ -> {:noreply, state}
    end
  end

  # Exits wait for the messages queued before a flush this process sends
  # itself (or for a full burst), and go to the sidecar together. No
  # selective receive: a mailbox full of watches is never scanned.
  def handle_info({:DOWN, ref, :process, pid, _reason}, state) do
    owner = Wire.pid_id(pid)

    case state.monitors do
      %{^owner => ^ref} ->
        state = %{
          state
          | monitors: Map.delete(state.monitors, owner),
            exiting: [owner | state.exiting],
            exiting_count: state.exiting_count + 1
        }

        cond do
          state.exiting_count >= @burst ->
            {:noreply, flush_exits(state)}

          state.flush_sent? ->
            {:noreply, state}

          true ->
            send(self(), :flush_exits)
            {:noreply, %{state | flush_sent?: true}}
        end

      _ ->
        {:noreply, state}
    end
  end

  def handle_info(:flush_exits, state), do: {:noreply, flush_exits(%{state | flush_sent?: false})}

  def handle_info(_other, state), do: {:noreply, state}

  defp flush_exits(%{exiting: []} = state), do: state

  defp flush_exits(state) do
    Writes.exit_owners(state.table, Enum.reverse(state.exiting))
    %{state | exiting: [], exiting_count: 0}
  end

  defp watch(owner, state) do
    if Map.has_key?(state.monitors, owner) do
      state
    else
      ref = Process.monitor(Wire.id_pid(state.template, owner))
      %{state | monitors: Map.put(state.monitors, owner, ref)}
    end
  end
end
