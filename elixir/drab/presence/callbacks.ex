defmodule Drab.Presence.Callbacks do
  @moduledoc false
  # Phoenix 1.7's server-side presence callbacks: `init/1` once, then
  # `handle_metas/4` after each `presence_diff` is broadcast, with the topic,
  # the diff (as broadcast, after `fetch/2`), the topic's presences as
  # `%{key => [meta]}` and the client state.
  #
  # One process per presence module, started only when the module defines
  # `handle_metas/4`. The dispatcher casts it each diff part after the
  # broadcast, in the order the parts went out, so calls are serialised and
  # in operation order per topic, and no caller of track/untrack/update
  # ever waits for them. The presences it passes are built from the diffs,
  # exactly as Phoenix.Presence builds them (its merge_diff), and start
  # empty when this process starts, as Phoenix's do.
  #
  # User code cannot stop delivery here either: a `handle_metas/4` that
  # raises, throws, exits or returns something else is logged, and the
  # client state stays what it was.
  use GenServer
  require Logger

  @doc false
  @spec child_spec({module(), keyword()}) :: Supervisor.child_spec()
  def child_spec({module, opts}) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [module, opts]}}
  end

  @doc false
  @spec start_link(module(), keyword()) :: GenServer.on_start()
  def start_link(module, _opts) do
    GenServer.start_link(__MODULE__, module, name: name(module))
  end

  @doc "The registered name of `module`'s callback process."
  @spec name(module()) :: atom()
  def name(module), do: Module.concat(module, Callbacks)

  @doc "Whether `module` uses the callbacks, i.e. defines `handle_metas/4`."
  @spec enabled?(module()) :: boolean()
  def enabled?(module) do
    Code.ensure_loaded?(module) and function_exported?(module, :handle_metas, 4)
  end

  @doc """
  Raises Phoenix's `ArgumentError` when `module` defines `handle_metas/4`
  without `init/1`.
  """
  @spec check!(module()) :: :ok
  def check!(module) do
    if enabled?(module) and not function_exported?(module, :init, 1) do
      raise ArgumentError, """
      missing #{inspect(module)}.init/1 callback for client state

      When you implement the handle_metas/4 callback, you must also
      implement init/1. For example, add the following to
      #{inspect(module)}:

      def init(_opts), do: {:ok, %{}}

      """
    end

    :ok
  end

  @doc "Hands one broadcast diff to `server` (a pid or name); never blocks."
  @spec diff(GenServer.server(), String.t(), %{joins: map(), leaves: map()}) :: :ok
  def diff(server, topic, payload), do: GenServer.cast(server, {:diff, topic, payload})

  @doc "Returns once every diff handed to `server` before the call is handled."
  @spec sync(GenServer.server(), timeout()) :: :ok
  def sync(server, timeout), do: GenServer.call(server, :sync, timeout)

  ## Server

  @impl true
  def init(module) do
    check!(module)

    case module.init(%{}) do
      {:ok, client_state} ->
        {:ok, %{module: module, topics: %{}, client_state: client_state}}

      other ->
        raise ArgumentError,
              "expected #{inspect(module)}.init/1 to return {:ok, state}, got: #{inspect(other)}"
    end
  end

  @impl true
  def handle_cast({:diff, topic, diff}, state) do
    topics = merge_diff(state.topics, topic, diff)
    presences = Map.get(topics, topic, %{})
    {:noreply, %{state | topics: topics, client_state: call(state, topic, diff, presences)}}
  end

  @impl true
  def handle_call(:sync, _from, state), do: {:reply, :ok, state}

  defp call(%{module: module, client_state: client_state}, topic, diff, presences) do
    case module.handle_metas(topic, diff, presences, client_state) do
      {:ok, new_state} ->
        new_state

      other ->
        Logger.error(
          "expected #{inspect(module)}.handle_metas/4 to return {:ok, new_state}, got: " <>
            "#{inspect(other)}; the client state is kept as it was"
        )

        client_state
    end
  catch
    kind, reason ->
      Logger.error(
        "#{inspect(module)}.handle_metas/4 failed on #{inspect(topic)}; the client state " <>
          "is kept as it was: " <> Exception.format(kind, reason, __STACKTRACE__)
      )

      client_state
  end

  # Phoenix.Presence's own merge, so that presences are what a Phoenix app
  # sees: joined metas are appended to a key's (those it has already are
  # not added twice), left ones removed, and an empty key or topic dropped.
  defp merge_diff(topics, topic, %{joins: joins, leaves: leaves}) do
    presences = Map.get(topics, topic, %{})

    presences =
      Enum.reduce(joins, presences, fn {key, presence}, acc ->
        new_metas = Map.get(presence, :metas, [])

        case acc do
          %{^key => existing} -> Map.put(acc, key, existing ++ (new_metas -- existing))
          _ -> Map.put(acc, key, new_metas)
        end
      end)

    presences =
      Enum.reduce(leaves, presences, fn {key, presence}, acc ->
        case Map.get(acc, key, []) -- Map.get(presence, :metas, []) do
          [] -> Map.delete(acc, key)
          remaining -> Map.put(acc, key, remaining)
        end
      end)

    if map_size(presences) == 0,
      do: Map.delete(topics, topic),
      else: Map.put(topics, topic, presences)
  end
end
