defmodule Drab.Presence.Definition do
  @moduledoc false
  # The functions of a presence module: those `use Phoenix.Presence` defines,
  # plus Drab's counting and start/stop hooks. `Drab.Presence` is defined with
  # it, and so is every module that does `use Drab.Presence`.

  defmacro __using__(opts) do
    quote location: :keep, bind_quoted: [opts: opts] do
      # Drab.Presence defines the behaviour, so it cannot also declare it.
      if __MODULE__ != Drab.Presence, do: @behaviour(Drab.Presence)

      @drab_presence_opts opts

      alias Drab.Presence.Calls

      @doc """
      Returns the child specification that starts this presence module under
      a supervisor. See `start_link/1` for `opts`.
      """
      @spec child_spec(keyword()) :: Supervisor.child_spec()
      def child_spec(opts \\ []) do
        %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}, type: :supervisor}
      end

      @doc """
      Starts the processes of this presence module: its diff dispatcher and
      its built-in subscriber registry. The table itself is created on the
      first start and survives restarts.

      Options are merged as Phoenix.Presence merges them, in increasing
      precedence: the options given to `use`, `opts` (the child spec's), and
      the application env (`config otp_app, #{inspect(__MODULE__)}, ...`),
      so that what is configured for an environment wins.

      #{Drab.Presence.Options.docs()}
      """
      @spec start_link(keyword()) :: Supervisor.on_start()
      def start_link(opts \\ []) do
        layers = Drab.Presence.Definition.options(__MODULE__, @drab_presence_opts, opts)
        Drab.Presence.Supervisor.start_link(__MODULE__, layers)
      end

      @doc false
      # The options of `use`, and those configured for the app.
      @spec __presence_options__() :: keyword()
      def __presence_options__ do
        __MODULE__
        |> Drab.Presence.Definition.options(@drab_presence_opts, [])
        |> Enum.reduce([], &Keyword.merge(&2, &1))
      end

      @doc """
      Tracks the socket's channel process under `key` on the socket's topic.
      See `track/4`.
      """
      @spec track(Drab.Presence.socket(), Drab.Presence.key(), map()) ::
              {:ok, binary()} | {:error, term()}
      def track(%{channel_pid: pid, topic: topic}, key, meta), do: track(pid, topic, key, meta)

      @doc """
      Tracks `pid` under `key` on `topic`, with `meta`.

      Returns `{:ok, phx_ref}`, or `{:error, {:already_tracked, pid, topic, key}}`
      when `pid` is already tracked under `key` on `topic`. The presence leaves
      on its own when `pid` exits. A `pid` that has already exited is answered
      as Phoenix answers it, `{:ok, phx_ref}`, and its presence is gone at once:
      neither listed nor counted. A pid of another node, or anything that is
      not a pid, raises `ArgumentError`, and so does this and every other
      call of a module that is not running (before its start, after a stop:
      see "Restarts and shutdown" in `Drab.Presence`).
      """
      @spec track(pid(), Drab.Presence.topic(), Drab.Presence.key(), map()) ::
              {:ok, binary()} | {:error, term()}
      def track(pid, topic, key, meta), do: Calls.track(__MODULE__, pid, topic, key, meta)

      @doc "Stops tracking the socket's channel process under `key` on its topic."
      @spec untrack(Drab.Presence.socket(), Drab.Presence.key()) :: :ok
      def untrack(%{channel_pid: pid, topic: topic}, key), do: untrack(pid, topic, key)

      @doc "Stops tracking `pid` under `key` on `topic`. Returns `:ok` even if it was not tracked."
      @spec untrack(pid(), Drab.Presence.topic(), Drab.Presence.key()) :: :ok
      def untrack(pid, topic, key), do: Calls.untrack(__MODULE__, pid, topic, key)

      @doc "Updates the meta of the socket's presence under `key`. See `update/4`."
      @spec update(Drab.Presence.socket(), Drab.Presence.key(), map() | (map() -> map())) ::
              {:ok, binary()} | {:error, :nopresence | :contended}
      def update(%{channel_pid: pid, topic: topic}, key, meta), do: update(pid, topic, key, meta)

      @doc """
      Replaces the meta of `pid`'s presence under `key` on `topic` with a map,
      or with what a function makes of the current meta.

      The presence gets a new `phx_ref`, and the old one as `phx_ref_prev`.
      A meta equal to the current one changes nothing and sends no diff.
      Returns `{:error, :nopresence}` when there is no such presence.

      A function runs in the caller, on the current meta (with its
      `phx_ref`), and its result is written only if nobody changed the
      presence meanwhile; otherwise it runs again on the newer meta. If it
      keeps losing to other writers for a second (a slow function racing a
      frequent writer), `update/4` gives up with `{:error, :contended}` and the
      presence keeps the other writer's meta. A function that raises, throws
      or exits raises `ArgumentError` and leaves the presence unchanged.
      """
      @spec update(pid(), Drab.Presence.topic(), Drab.Presence.key(), map() | (map() -> map())) ::
              {:ok, binary()} | {:error, :nopresence | :contended}
      def update(pid, topic, key, meta), do: Calls.update(__MODULE__, pid, topic, key, meta)

      @doc """
      Returns the presences of a topic (or a socket's topic) as
      `%{key => %{metas: [meta]}}`, keys as strings, passed through `fetch/2`.
      """
      @spec list(Drab.Presence.socket() | Drab.Presence.topic()) :: Drab.Presence.presences()
      def list(%{topic: topic}), do: list(topic)
      def list(topic), do: Calls.list(__MODULE__, topic)

      @doc """
      Returns `%{metas: [meta]}` of one key on a topic, passed through
      `fetch/2`, or `[]` when the key is not present.
      """
      @spec get_by_key(Drab.Presence.socket() | Drab.Presence.topic(), Drab.Presence.key()) ::
              map() | []
      def get_by_key(%{topic: topic}, key), do: get_by_key(topic, key)
      def get_by_key(topic, key), do: Calls.get_by_key(__MODULE__, topic, key)

      @doc """
      Extends presences with data of your own before they are listed or sent
      in a diff. The default returns them unchanged. Called once per `list/1`
      and twice per diff (joins, then leaves).
      """
      @spec fetch(Drab.Presence.topic(), Drab.Presence.presences()) :: Drab.Presence.presences()
      def fetch(_topic, presences), do: presences

      @doc "The number of distinct keys (users, or browsers) on a topic. O(1)."
      @spec count_users(Drab.Presence.socket() | Drab.Presence.topic()) :: non_neg_integer()
      def count_users(%{topic: topic}), do: count_users(topic)

      def count_users(topic) do
        {users, _connections} = Calls.counts(__MODULE__, topic)
        users
      end

      @doc "The number of connections (presences) on a topic. O(1)."
      @spec count_connections(Drab.Presence.socket() | Drab.Presence.topic()) :: non_neg_integer()
      def count_connections(%{topic: topic}), do: count_connections(topic)

      def count_connections(topic) do
        {_users, connections} = Calls.counts(__MODULE__, topic)
        connections
      end

      @doc """
      Drab's connect hook: tracks the socket's channel process on `topic`
      under the browser id (see `Drab.Presence`), with `online_at`.
      A socket already tracked there is fine: `{:ok, {:already_tracked, ...}}`.
      """
      @spec start(Drab.Presence.socket(), Drab.Presence.topic()) :: {:ok, term()}
      def start(socket, topic) do
        Drab.Presence.Definition.start(__MODULE__, socket, topic)
      end

      @doc "Drab's unsubscribe hook: untracks the socket's channel process from `topic`."
      @spec stop(Drab.Presence.socket(), Drab.Presence.topic()) :: :ok
      def stop(socket, topic) do
        untrack(socket.channel_pid, topic, Drab.Presence.Config.client_id(socket))
      end

      @doc """
      Subscribes the caller to `presence_diff` broadcasts of `topic`, through
      Phoenix.PubSub when it is configured, else through the built-in registry.
      """
      @spec subscribe(Drab.Presence.topic()) :: :ok | {:error, term()}
      def subscribe(topic), do: Calls.subscribe(__MODULE__, topic)

      @doc "Undoes `subscribe/1`."
      @spec unsubscribe(Drab.Presence.topic()) :: :ok
      def unsubscribe(topic), do: Calls.unsubscribe(__MODULE__, topic)

      @doc """
      Sizes of the table: `presences`, `owners` (processes), `topics`,
      `pending_topics` (topics with changes not taken for a diff yet),
      `queued_parts` (diff parts taken but not yet broadcast), `replicas`
      (other nodes whose presences are held here, in cluster mode),
      `max_meta_bytes`, and `nif_heap_bytes`, what the NIF holds on the Rust
      heap (for all presence modules together).
      """
      @spec stats() :: %{atom() => non_neg_integer()}
      def stats, do: Calls.stats(__MODULE__)

      @doc """
      Phoenix 1.7's `fetchers_pids/0`: processes that exit once every diff
      pending at the call has been passed through `fetch/2`, broadcast, and
      handed to `handle_metas/4`. Wait for them in tests as Phoenix's docs
      show:

          on_exit(fn ->
            for pid <- MyPresence.fetchers_pids() do
              ref = Process.monitor(pid)
              assert_receive {:DOWN, ^ref, _, _, _}, 1000
            end
          end)

      `[]` while the module is not running.
      """
      @spec fetchers_pids() :: [pid()]
      def fetchers_pids, do: Drab.Presence.Dispatcher.fetchers(__MODULE__)

      defoverridable fetch: 2, start: 2, stop: 2, child_spec: 1
    end
  end

  @doc false
  # The layers of a module's options, in Phoenix.Presence's order: `use`,
  # the child spec's `opts`, then the app env. Drab.Presence's app env is
  # Drab's presence config, and its pubsub server defaults to the Drab
  # endpoint's (a default, under everything given).
  @spec options(module(), keyword(), keyword()) :: [keyword()]
  def options(Drab.Presence, use_opts, opts) do
    defaults =
      case Drab.Presence.Config.endpoint_pubsub_server() do
        nil -> use_opts
        pubsub -> Keyword.put(use_opts, :pubsub_server, pubsub)
      end

    [defaults, opts, Drab.Presence.Config.options()]
  end

  def options(module, use_opts, opts) do
    case Keyword.fetch(use_opts, :otp_app) do
      {:ok, app} -> [use_opts, opts, Application.get_env(app, module, [])]
      :error -> [use_opts, opts]
    end
  end

  @doc false
  @spec start(module(), Drab.Presence.socket(), Drab.Presence.topic()) :: {:ok, term()}
  def start(module, socket, topic) do
    meta = %{online_at: System.system_time(:second)}

    case module.track(socket.channel_pid, topic, Drab.Presence.Config.client_id(socket), meta) do
      {:ok, _phx_ref} = ok -> ok
      {:error, {:already_tracked, _, _, _} = reason} -> {:ok, reason}
      {:error, reason} -> raise inspect(reason)
    end
  end
end
