defmodule Drab.Presence.Dispatcher do
  @moduledoc false
  # Sends each topic's pending diff as one `presence_diff`.
  #
  # The table tells this process (`:drab_presence_pending`) when the first
  # diff appears after a quiet spell; the dispatcher then waits one diff
  # window, drains every pending topic and broadcasts. Changes inside the
  # window coalesce in the table, so a join storm costs one diff per topic
  # per window, not one per join.
  use GenServer
  require Logger

  alias Drab.Presence.{Broadcast, Runtime}

  # Topics drained per step, so a backlog over many topics does not keep
  # other messages (and shutdown) waiting.
  @topics_per_step 256

  @doc false
  @spec child_spec({module(), keyword()}) :: Supervisor.child_spec()
  def child_spec({module, opts}) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [module, opts]}}
  end

  @doc false
  @spec start_link(module(), keyword()) :: GenServer.on_start()
  def start_link(module, opts) do
    GenServer.start_link(__MODULE__, {module, opts}, name: Module.concat(module, Dispatcher))
  end

  @impl true
  def init({module, opts}) do
    runtime = Runtime.ensure(module, opts)

    state = %{
      module: module,
      runtime: runtime,
      window: Keyword.fetch!(opts, :diff_window),
      scheduled?: false
    }

    # Diffs left by a crashed predecessor go out now.
    pending? = runtime.backend.set_dispatcher(runtime.table, self())
    {:ok, if(pending?, do: schedule(state, 0), else: state)}
  end

  @impl true
  def handle_info(:drab_presence_pending, state), do: {:noreply, schedule(state, state.window)}

  def handle_info(:flush, %{runtime: runtime} = state) do
    {diffs, still_pending} = runtime.backend.take_diffs(runtime.table, @topics_per_step)
    Enum.each(diffs, &deliver(state, &1))
    state = %{state | scheduled?: false}
    {:noreply, if(still_pending > 0, do: schedule(state, 0), else: state)}
  end

  def handle_info(message, state) do
    Logger.debug("#{inspect(__MODULE__)} ignored #{inspect(message)}")
    {:noreply, state}
  end

  defp schedule(%{scheduled?: true} = state, _delay), do: state

  defp schedule(state, 0) do
    send(self(), :flush)
    %{state | scheduled?: true}
  end

  defp schedule(state, delay) do
    Process.send_after(self(), :flush, delay)
    %{state | scheduled?: true}
  end

  # fetch/2 is user code: one that raises loses that topic's diff, not the
  # dispatcher (and with it every other topic's).
  defp deliver(%{module: module, runtime: runtime}, {topic, joins, leaves}) do
    payload = %{joins: module.fetch(topic, joins), leaves: module.fetch(topic, leaves)}
    Broadcast.local_broadcast(runtime.delivery, topic, payload)
  rescue
    exception ->
      Logger.error(
        "#{inspect(module)} could not broadcast presence_diff on #{inspect(topic)}: " <>
          Exception.format(:error, exception, __STACKTRACE__)
      )
  end
end
