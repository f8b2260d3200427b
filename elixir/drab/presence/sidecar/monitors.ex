defmodule Drab.Presence.Sidecar.Monitors do
  @moduledoc false
  # One of a small pool of processes that monitor the owners of a sidecar
  # table (the sidecar cannot monitor a pid). Owners are spread over the
  # pool by hash: no process per presence, and no single process taking
  # every DOWN of a mass disconnect.
  #
  # The port owner sends `{:watches, [{:watch | :unwatch, owner}]}`: a
  # watch when the sidecar says an owner got its first presence, an
  # unwatch when its last one went, in the sidecar's own order (one
  # process sends them all), so they never cross. A started port owner
  # sends `:watch_journal`: its predecessor may have died with watches it
  # had not sent yet. On DOWN, this process writes the exit straight to
  # the port.
  # While the sidecar restarts, exits wait here and go once it is back
  # (`:sidecar_ready`).
  use GenServer

  alias Drab.Presence.Sidecar.{Handle, Wire}

  @doc false
  @spec child_spec({Handle.t(), non_neg_integer()}) :: Supervisor.child_spec()
  def child_spec({handle, index}) do
    %{id: {__MODULE__, index}, start: {__MODULE__, :start_link, [handle, index]}}
  end

  @doc false
  @spec start_link(Handle.t(), non_neg_integer()) :: GenServer.on_start()
  def start_link(handle, index) do
    GenServer.start_link(__MODULE__, {handle, index}, name: elem(handle.monitors, index))
  end

  @impl true
  def init({handle, index}) do
    state = %{
      handle: handle,
      name: elem(handle.monitors, index),
      template: Wire.pid_template(),
      template_node: node(),
      monitors: %{},
      queued: []
    }

    # A restarted monitor takes over the owners the journal holds: its
    # predecessor's monitors died with it.
    {:ok, watch_journal(state)}
  end

  defp watch_journal(state) do
    :ets.select(state.handle.journal, [{{{:"$1", :_, :_}, :_, :_}, [], [:"$1"]}])
    |> Enum.dedup()
    |> Enum.filter(&(Handle.monitor_for(state.handle, &1) == state.name))
    |> Enum.reduce(Wire.fresh_template(state), &watch/2)
  end

  @impl true
  def handle_info({:watches, changes}, state) do
    state = Wire.fresh_template(state)
    {:noreply, Enum.reduce(changes, state, &change/2)}
  end

  def handle_info(:watch_journal, state), do: {:noreply, watch_journal(state)}

  def handle_info({:DOWN, ref, :process, pid, _reason}, state) do
    owner = Wire.pid_id(pid)

    case state.monitors do
      %{^owner => ^ref} ->
        state = %{state | monitors: Map.delete(state.monitors, owner)}
        {:noreply, send_exits(%{state | queued: [owner | state.queued]})}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info(:sidecar_ready, state), do: {:noreply, send_exits(state)}

  def handle_info(_other, state), do: {:noreply, state}

  defp change({:watch, owner}, state), do: watch(owner, state)

  defp change({:unwatch, owner}, state) do
    case Map.pop(state.monitors, owner) do
      {nil, _} ->
        state

      {ref, monitors} ->
        Process.demonitor(ref, [:flush])
        %{state | monitors: monitors}
    end
  end

  defp watch(owner, state) do
    if Map.has_key?(state.monitors, owner) do
      state
    else
      ref = Process.monitor(Wire.id_pid(state.template, owner))
      %{state | monitors: Map.put(state.monitors, owner, ref)}
    end
  end

  # While the sidecar restarts, exits wait: the replay skips owners that
  # are dead by then, and one that dies during it is sent once it is back.
  defp send_exits(%{queued: []} = state), do: state

  defp send_exits(state) do
    case Handle.current(state.handle) do
      {_epoch, nil} ->
        state

      {_epoch, port} ->
        frames =
          for owner <- Enum.reverse(state.queued),
              do: [Wire.op(:exit), <<0::64, 0::64, owner::64>>]

        try do
          Enum.each(frames, &Port.command(port, &1))
          %{state | queued: []}
        rescue
          # The port closed under us: the port owner is restarting it.
          ArgumentError -> state
        end
    end
  end
end
