defmodule Drab.Presence do
  @moduledoc """
  Who is on each Drab topic, held in a Rust table and counted in O(1).

  A drop-in replacement for drab 0.10's `Drab.Presence`: the same functions,
  the same config, the same return values as `Phoenix.Presence`, and the
  same `"presence_diff"` broadcasts, which the phoenix.js `Presence` client
  understands. What changes is underneath: presences live in a table inside
  a NIF, written and read directly by the calling process, and counted from
  counters kept as entries change.

  ## Setup

  Enable presence as with Drab, in `config/runtime.exs` (so that Drab does
  not compile a `Drab.Presence` of its own), and add `Drab.Presence` to
  your supervision tree:

      # config/runtime.exs
      config :drab, :presence, true     # or a keyword list, e.g. id: [session: :user_id]

      children = [
        MyAppWeb.Endpoint,
        Drab.Presence
      ]

  Drab calls `start/2` when a browser connects or subscribes to a topic, and
  `stop/2` when it unsubscribes. A presence leaves by itself when its channel
  process exits, for any reason.

  ## Examples

      iex> browser = spawn(fn -> Process.sleep(:infinity) end)
      iex> {:ok, phx_ref} = Drab.Presence.track(browser, "doc:lobby", 42, %{online_at: 1})
      iex> Drab.Presence.count_users("doc:lobby")
      1
      iex> Drab.Presence.list("doc:lobby")
      %{"42" => %{metas: [%{online_at: 1, phx_ref: phx_ref}]}}
      iex> Drab.Presence.track(browser, "doc:lobby", 42, %{})
      {:error, {:already_tracked, browser, "doc:lobby", 42}}
      iex> {:ok, _} = Drab.Presence.track(spawn(fn -> Process.sleep(:infinity) end), "doc:lobby", 42, %{})
      iex> {Drab.Presence.count_users("doc:lobby"), Drab.Presence.count_connections("doc:lobby")}
      {1, 2}
      iex> {:ok, new_ref} = Drab.Presence.update(browser, "doc:lobby", 42, &Map.put(&1, :typing, true))
      iex> %{metas: [%{typing: true, phx_ref: ^new_ref, phx_ref_prev: ^phx_ref} | _]} =
      ...>   Drab.Presence.get_by_key("doc:lobby", 42)
      iex> Drab.Presence.untrack(browser, "doc:lobby", 42)
      :ok
      iex> Drab.Presence.count_connections("doc:lobby")
      1

  ## Configuration

      config :drab, :presence,
        id: [store: :current_user_id, session: :current_user_id],
        module: MyAppWeb.MyPresence,
        endpoint: MyAppWeb.Endpoint

    * `:id` - where the presence key comes from: `[session: key]`,
      `[store: key]`, or both, the first one listed winning. Without a value
      there, the key is the browser id (`socket.assigns.__client_id`).
      `config :drab, :presence, true` uses the browser id (it is read as
      `id: []` when the application starts, since Drab 0.10 itself fails on
      `true`); a keyword list without `:id` means `[session: :user_id]`, as
      in Drab.
    * `:module` - your own presence module (see below). Defaults to `Drab.Presence`.
    * `:endpoint` - the endpoint whose pubsub server carries diffs, when the
      `:drab` config names several.

  Options of our own go in the same list (or in `start_link/1`):

  #{Drab.Presence.Options.docs()}

  ## Own presence modules

      defmodule MyAppWeb.MyPresence do
        use Drab.Presence, otp_app: :my_app, pubsub_server: MyApp.PubSub

        def fetch(_topic, presences) do
          for {key, %{metas: metas}} <- presences, into: %{} do
            {key, %{metas: metas, user: MyApp.Users.get_name(key)}}
          end
        end
      end

  Add it to your supervision tree and to the config as `module:`; Drab then
  calls its `start/2` and `stop/2`, which you may override too.

  ## Diffs

  Every change reaches subscribers of its topic as a `"presence_diff"`
  broadcast with `%{joins: presences, leaves: presences}`, each passed
  through `fetch/2`. Changes to one topic within `:diff_window` milliseconds
  go out as one diff; a presence that joins and leaves within the window is
  never sent (unless `list/1` or `get_by_key/2` showed it meanwhile: then its
  join and its leave go out in the same diff, so that a client that synced
  from that listing drops it, and one that did not never hears a ref leave
  that it did not hear join); an update that leaves the meta as it was sends
  nothing. A
  diff carries at most 500 presences: a larger change (a mass disconnect)
  goes out as several consecutive diffs, so that no single send copies
  megabytes into every subscriber, and a key's leave and join (an update)
  travel in the same one. Applied in order, as phoenix.js applies them, they
  amount to the whole change. Diffs are delivered at least once: one sent
  twice after a crash is harmless to a client that applies them by ref.

  With a `:pubsub_server` and Phoenix on the code path, diffs go out exactly
  as Phoenix.Presence sends them, through `Phoenix.Channel.Server.local_broadcast/4`,
  so channels forward them to the browser. Without one, processes receive
  them after `subscribe/1`, as `%Drab.Presence.Broadcast{}` (or
  `%Phoenix.Socket.Broadcast{}` when Phoenix is loaded).

  ## Server-side callbacks (Phoenix 1.7)

  A presence module may define Phoenix 1.7's `init/1` and `handle_metas/4`,
  with the same arguments and at the same moments as Phoenix.Presence:

      defmodule MyAppWeb.Presence do
        use Drab.Presence, otp_app: :my_app, pubsub_server: MyApp.PubSub

        def init(_opts), do: {:ok, %{}}

        def handle_metas(topic, %{joins: joins, leaves: leaves}, presences, state) do
          Phoenix.PubSub.local_broadcast(MyApp.PubSub, "proxy:" <> topic, {:metas, joins, leaves})
          {:ok, state}
        end
      end

  They run in a process of the module's own, one call at a time, after the
  diff is broadcast and in the order diffs go out, so a topic's calls come
  in the order of its changes; never in the caller of `track/4` and the
  like. With `diff_window: 0` there is one call per operation, as in
  Phoenix; with a window, one per (part of a) coalesced diff. `presences`
  is built from the diffs since that process started, as Phoenix builds it.
  A `handle_metas/4` that raises or returns something other than
  `{:ok, state}` is logged and the state kept (Phoenix crashes its tracker).
  `fetchers_pids/0` returns processes that exit when the pending diffs
  have been fetched, broadcast and handed to `handle_metas/4`.

  ## Performance

  `track/4`, `untrack/3` and `update/4` run in the caller, in a NIF that
  holds the table lock for microseconds. `count_users/1` and
  `count_connections/1` read counters: O(1) at any topic size. `list/1` is
  O(presences on the topic); a listing over 1,000 presences or 64 KB is
  built from a copy-on-write snapshot on a dirty scheduler, so no normal
  scheduler is held up and writers are never blocked by a reader.

  ## Telemetry

  When the app has `:telemetry` (every Phoenix app does; drab_presence
  does not depend on it), these events are emitted. Whether it is there is
  decided when a presence module starts: without it, nothing is called.

    * `[:drab_presence, :diff, :broadcast]` - a part of a topic's
      `presence_diff` was broadcast.
      Measurements: `%{joins: n, leaves: n, latency_ms: float}`: presences
      that joined and left in it, and the milliseconds from the oldest
      change it carries (the topic's first change since its previous diff)
      until its broadcast returned.
      Metadata: `%{module: module, topic: topic}`.

    * `[:drab_presence, :fetch, :exception]` - `fetch/2` raised, threw or
      exited; that part of the diff is dropped (and logged).
      Measurements: `%{joins: n, leaves: n}`.
      Metadata: `%{module: module, topic: topic, kind: kind, reason: reason,
      stacktrace: stacktrace}`.

    * `[:drab_presence, :sidecar, :restart]` - the sidecar (`backend:
      :sidecar`) died and a new one was started and replayed.
      Measurements: `%{presences: n, duration_ms: float}`: presences
      replayed, and the time writes waited for it.
      Metadata: `%{module: module, reason: String.t()}`.

    * `[:drab_presence, :sidecar, :resync]` - owners whose writer was
      killed mid-write were resynced into the sidecar.
      Measurements: `%{owners: n}`. Metadata: `%{module: module}`.

    * `[:drab_presence, :cluster, :peer_up]` - a node running the same
      module was heard from for the first time, or again after it was down.
      Measurements: `%{}`. Metadata: `%{module: module, node: node}`.

    * `[:drab_presence, :cluster, :peer_down]` - a peer is down (nodedown,
      or silent for `down_period`); its presences left.
      Measurements: `%{presences: n}`.
      Metadata: `%{module: module, node: node, reason: String.t()}`.

    * `[:drab_presence, :cluster, :resync]` - a peer's full state was
      applied (when it first appears, after a gap in its deltas, a heal, or
      a sidecar restart).
      Measurements: `%{bytes: n}`. Metadata: `%{module: module, node: node}`.

  > #### Restarts and shutdown {: .warning}
  >
  > The table outlives the processes of the package: a crashed or restarted
  > dispatcher loses no presence of a live process, and diffs pending or
  > half-delivered at the crash go out when it is back. A presence module
  > that is stopped, or whose supervisor died, takes no call: every
  > function raises the `ArgumentError` it raises before the first start
  > (no dispatcher would announce a write made meanwhile), as
  > Phoenix.Presence's calls fail without their tracker; `fetchers_pids/0`
  > returns `[]`. Its presences stay, and processes that exit meanwhile
  > still leave: the next start in the same VM lists them and sends the
  > diffs left pending. The NIF library is loaded once per VM: a code
  > reload of `Drab.Presence.Native` is refused, and new native code needs
  > a restart.
  """

  @typedoc "A Drab or Phoenix socket: anything with `topic`, `channel_pid` and `assigns`."
  @type socket :: Drab.Presence.Config.socket()

  @typedoc "A topic: a binary."
  @type topic :: String.t()

  @typedoc "A presence key. Listed as a string (`to_string/1`), as Phoenix.Presence does."
  @type key :: String.Chars.t()

  @typedoc "Presences as listed: `%{key => %{metas: [meta]}}`, plus what `fetch/2` adds."
  @type presences :: %{
          optional(String.t()) => %{required(:metas) => [map()], optional(any()) => any()}
        }

  @doc "Extends listed and diffed presences; see `Drab.Presence.fetch/2`."
  @callback fetch(topic(), presences()) :: presences()

  @doc "Drab's connect and subscribe hook."
  @callback start(socket(), topic()) :: {:ok, term()}

  @doc "Drab's unsubscribe hook."
  @callback stop(socket(), topic()) :: :ok

  @doc """
  Phoenix 1.7's client state: called once with `%{}` when the module starts,
  in the process that then calls `handle_metas/4`. Required when
  `handle_metas/4` is defined: without it, `start_link/1` raises
  Phoenix's `ArgumentError`.
  """
  @callback init(state :: term()) :: {:ok, new_state :: term()}

  @doc """
  Phoenix 1.7's server-side diff callback: called after each
  `presence_diff` is broadcast, with its topic, the diff as broadcast
  (`%{joins: ..., leaves: ...}`, through `fetch/2`), the topic's presences
  as `%{key => [meta]}` built from the diffs, and the client state. Returns
  `{:ok, new_state}`. See "Server-side callbacks" in `Drab.Presence`.
  """
  @callback handle_metas(
              topic(),
              diff :: %{joins: presences(), leaves: presences()},
              presences :: %{optional(String.t()) => [map()]},
              state :: term()
            ) :: {:ok, new_state :: term()}

  @optional_callbacks init: 1, handle_metas: 4

  @doc """
  Defines a presence module of your own.

  Options: `:otp_app` (required; the app whose env holds more options) and
  any option of `start_link/1`, such as `:pubsub_server`.
  """
  defmacro __using__(opts) do
    unless Keyword.has_key?(opts, :otp_app) do
      raise ArgumentError,
            "use Drab.Presence expects :otp_app, e.g. use Drab.Presence, otp_app: :my_app"
    end

    quote do
      use Drab.Presence.Definition, unquote(opts)
    end
  end

  use Drab.Presence.Definition, otp_app: :drab
end
