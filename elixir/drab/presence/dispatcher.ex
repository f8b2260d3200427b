defmodule Drab.Presence.Dispatcher do
  @moduledoc false
  # Sends each topic's pending diff as `presence_diff` broadcasts.
  #
  # The table tells this process (`:drab_presence_pending`) when the first
  # diff appears after a quiet spell; the dispatcher then waits one diff
  # window and moves every pending topic's diff into the table's outbox, cut
  # into parts. Changes inside the window coalesce in the table, so a join
  # storm costs one diff per topic per window, not one per join. While
  # changes keep coming, diffs are taken once per window, counted from the
  # previous take: a cycle lasts the window, or the delivery if that takes
  # longer, never the two added up.
  #
  # Delivery is at least once: a part stays in the outbox until it has been
  # handed to the broadcast. A dispatcher killed or stopped mid-delivery
  # leaves it there, and its successor sends it first. Sent twice, a part is
  # harmless: a client applies joins and leaves by ref.
  use GenServer
  require Logger

  alias Drab.Presence.{Broadcast, Callbacks, Runtime, Telemetry}

  # Work per message, so a backlog over many topics does not keep other
  # messages (and shutdown) waiting.
  @topics_per_step 256
  @parts_per_step 16

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

  @doc "The registered name of `module`'s dispatcher."
  @spec name(module()) :: atom()
  def name(module), do: Module.concat(module, Dispatcher)

  # How long a fetcher waits for the dispatcher and the callback process.
  @fetcher_patience_ms 60_000

  @doc """
  Phoenix's `fetchers_pids/0`: processes that exit once every diff pending
  now has been fetched and broadcast, and handed to `handle_metas/4`.
  Phoenix runs `fetch/2` in short-lived tasks, and tests wait for those to
  exit; here a process stands for the work, so the same wait works. `[]`
  while the module is not running.
  """
  @spec fetchers(module()) :: [pid()]
  def fetchers(module) do
    case Process.whereis(name(module)) do
      nil ->
        []

      dispatcher ->
        callbacks = Callbacks.name(module)

        [
          spawn(fn ->
            # Diffs the backend has not told the dispatcher of yet (the
            # sidecar does so in frames of its own) count as pending too.
            # A module stopped, or a dispatcher or callback process gone,
            # meanwhile has no more work to wait for.
            try do
              %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
              :ok = backend.sync_writes(table)
              GenServer.call(dispatcher, :await_idle, @fetcher_patience_ms)
              if Process.whereis(callbacks), do: Callbacks.sync(callbacks, @fetcher_patience_ms)
            rescue
              ArgumentError -> :ok
            catch
              :exit, _ -> :ok
            end
          end)
        ]
    end
  end

  @impl true
  def init({module, opts}) do
    runtime = Runtime.ensure(module, opts)

    state = %{
      module: module,
      runtime: runtime,
      window: Keyword.fetch!(opts, :diff_window),
      scheduled?: false,
      # Taking diffs until a take finds nothing: wakes are redundant then.
      busy?: false,
      next_take_at: now(),
      window_start: now(),
      rest_pending?: false,
      # handle_metas/4's process, when the module defines it.
      callbacks: if(Callbacks.enabled?(module), do: Callbacks.name(module)),
      # Fetchers waiting for the next idle moment.
      idle_waiters: []
    }

    # Diffs left by a predecessor (pending or unacknowledged) go out now.
    pending? = runtime.backend.set_dispatcher(runtime.table, self())
    {:ok, if(pending?, do: schedule(%{state | busy?: true}, 0), else: state)}
  end

  @impl true
  def handle_call(:await_idle, _from, %{busy?: false} = state), do: {:reply, :ok, state}

  def handle_call(:await_idle, from, state),
    do: {:noreply, %{state | idle_waiters: [from | state.idle_waiters]}}

  @impl true
  def handle_info(:drab_presence_pending, %{busy?: true} = state), do: {:noreply, state}

  def handle_info(:drab_presence_pending, state) do
    {:noreply, schedule(%{state | busy?: true, next_take_at: now() + state.window}, state.window)}
  end

  def handle_info(:flush, state) do
    state = %{state | scheduled?: false}

    with :empty <- deliver_parts(state, @parts_per_step),
         now = now(),
         true <- now >= state.next_take_at || {:wait, state.next_take_at - now} do
      %Runtime{backend: backend, table: table} = state.runtime
      # The window is counted from the first take of a round: topics a take
      # had no room for are taken as soon as its parts are out, in the same
      # window, not a window later.
      window_start = if state.rest_pending?, do: state.window_start, else: now

      case backend.take_diffs(table, @topics_per_step) do
        {0, 0} ->
          for waiter <- state.idle_waiters, do: GenServer.reply(waiter, :ok)
          {:noreply, %{state | busy?: false, rest_pending?: false, idle_waiters: []}}

        {_queued, still_pending} ->
          rest_pending? = still_pending > 0
          next_take_at = if rest_pending?, do: now, else: window_start + state.window

          state = %{
            state
            | window_start: window_start,
              rest_pending?: rest_pending?,
              next_take_at: next_take_at
          }

          {:noreply, schedule(state, 0)}
      end
    else
      :more -> {:noreply, schedule(state, 0)}
      {:wait, delay} -> {:noreply, schedule(state, delay)}
    end
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

  defp now, do: System.monotonic_time(:millisecond)

  defp deliver_parts(_state, 0), do: :more

  defp deliver_parts(%{runtime: %Runtime{backend: backend, table: table}} = state, budget) do
    case backend.next_part(table) do
      :none ->
        :empty

      {id, topic, joins, leaves, age_us} ->
        # The part's latency: its age as handed out, plus the time until
        # its broadcast returns.
        handed_out_at = System.monotonic_time(:microsecond) - age_us
        deliver(state, topic, joins, leaves, handed_out_at)
        :ok = backend.ack_part(table, id)
        deliver_parts(state, budget - 1)
    end
  end

  # fetch/2 is user code: one that raises, throws or exits (a GenServer.call
  # timing out) loses that part of that topic's diff, not the dispatcher
  # and with it every other topic's. So does a broadcast that fails (a
  # pubsub server that is not running).
  defp deliver(
         %{module: module, runtime: runtime, callbacks: callbacks},
         topic,
         joins,
         leaves,
         since
       ) do
    payload = fetch(module, topic, joins, leaves)
    Broadcast.local_broadcast(runtime.delivery, topic, payload)

    if Telemetry.enabled?() do
      Telemetry.execute(
        [:diff, :broadcast],
        %{
          joins: Telemetry.presences(joins),
          leaves: Telemetry.presences(leaves),
          latency_ms: (System.monotonic_time(:microsecond) - since) / 1_000
        },
        %{module: module, topic: topic}
      )
    end

    if callbacks, do: Callbacks.diff(callbacks, topic, payload)
  catch
    kind, reason ->
      Logger.error(
        "#{inspect(module)} dropped a presence_diff on #{inspect(topic)} " <>
          "(#{map_size(joins)} joins, #{map_size(leaves)} leaves): " <>
          Exception.format(kind, reason, __STACKTRACE__)
      )
  end

  defp fetch(module, topic, joins, leaves) do
    %{joins: module.fetch(topic, joins), leaves: module.fetch(topic, leaves)}
  catch
    kind, reason ->
      stacktrace = __STACKTRACE__

      Telemetry.execute(
        [:fetch, :exception],
        %{joins: Telemetry.presences(joins), leaves: Telemetry.presences(leaves)},
        %{module: module, topic: topic, kind: kind, reason: reason, stacktrace: stacktrace}
      )

      :erlang.raise(kind, reason, stacktrace)
  end
end
