defmodule Bench.Adapter do
  @moduledoc false
  # What a workload needs of a presence system. One implementation per
  # system, so every workload runs the same code against both.

  @callback name() :: String.t()
  @callback start(pubsub :: atom() | nil) :: :ok
  @callback track(pid(), String.t(), String.t(), map()) :: {:ok, term()} | {:error, term()}
  @callback untrack(pid(), String.t(), String.t()) :: :ok
  @callback update(pid(), String.t(), String.t(), map()) :: {:ok, term()} | {:error, term()}
  @callback list(String.t()) :: map()
  @callback count_users(String.t()) :: non_neg_integer()
  @callback count_connections(String.t()) :: non_neg_integer()
  @callback subscribe(String.t()) :: :ok | {:error, term()}
  @doc "Presences held, over all topics."
  @callback presences() :: non_neg_integer()
  @doc "Bytes held outside the BEAM's allocators (the NIF's Rust heap), or nil: none."
  @callback native_bytes() :: non_neg_integer() | nil
  @doc "Waits until no diff is pending or on its way (failing past a default timeout)."
  @callback quiesce() :: :ok
  @doc "The same, failing past `timeout_ms`."
  @callback quiesce(timeout_ms :: non_neg_integer()) :: :ok
  @doc "The presence module, for workloads that call it as an app's code does (channels)."
  @callback presence() :: module()

  @doc "True when the process is idle: nothing in its mailbox, not running."
  def idle?(pid) do
    case Process.info(pid, [:message_queue_len, :status]) do
      [message_queue_len: 0, status: :waiting] -> true
      _ -> false
    end
  end
end

defmodule Bench.DrabPresence do
  @moduledoc false
  # Our side, on its defaults (diff_window: 50). The pubsub server is given
  # at start: Phoenix.PubSub when Phoenix is there, else the built-in registry.
  use Drab.Presence, otp_app: :drab_presence
end

defmodule Bench.Adapter.Ours do
  @moduledoc false
  # Our side through a presence module: one adapter per backend, the same code.
  defmacro __using__(presence: presence, name: name) do
    quote do
      @behaviour Bench.Adapter
      alias unquote(presence), as: P

      @impl true
      def name, do: unquote(name)

      @impl true
      def presence, do: P

      @impl true
      def start(pubsub) do
        {:ok, _} = P.start_link(pubsub_server: pubsub)
        :ok
      end

      @impl true
      def track(pid, topic, key, meta), do: P.track(pid, topic, key, meta)
      @impl true
      def untrack(pid, topic, key), do: P.untrack(pid, topic, key)
      @impl true
      def update(pid, topic, key, meta), do: P.update(pid, topic, key, meta)
      @impl true
      def list(topic), do: P.list(topic)
      @impl true
      def count_users(topic), do: P.count_users(topic)
      @impl true
      def count_connections(topic), do: P.count_connections(topic)
      @impl true
      def subscribe(topic), do: P.subscribe(topic)
      @impl true
      def presences, do: P.stats().presences
      @impl true
      def native_bytes, do: P.stats().nif_heap_bytes

      @impl true
      def quiesce(timeout_ms \\ 120_000) do
        dispatcher = Process.whereis(Module.concat(P, Dispatcher))

        # On the sidecar a write does not wait for the sidecar: "nothing
        # pending" can be read before it has seen the last writes. The
        # fetchers exit once every write made before is applied and its
        # diff broadcast (a no-op wait on the NIF).
        for pid <- P.fetchers_pids() do
          ref = Process.monitor(pid)

          receive do
            {:DOWN, ^ref, _, _, _} -> :ok
          after
            timeout_ms -> raise "#{unquote(name)}: diffs still going out after #{timeout_ms} ms"
          end
        end

        Bench.Harness.wait_until(
          fn -> P.stats().pending_topics == 0 and Bench.Adapter.idle?(dispatcher) end,
          "#{unquote(name)} diffs to go out",
          timeout_ms
        )

        :ok
      end
    end
  end
end

defmodule Bench.Adapter.Drab do
  @moduledoc false
  use Bench.Adapter.Ours, presence: Bench.DrabPresence, name: "Drab.Presence"
end

defmodule Bench.UnwindowedPresence do
  @moduledoc false
  # Our side with one diff per operation (diff_window: 0), as Phoenix sends
  # them: for the channel storms, where the window is what is compared.
  use Drab.Presence, otp_app: :drab_presence, diff_window: 0
end

defmodule Bench.Adapter.Unwindowed do
  @moduledoc false
  use Bench.Adapter.Ours, presence: Bench.UnwindowedPresence, name: "Drab.Presence (diff_window: 0)"
end

defmodule Bench.SidecarPresence do
  @moduledoc false
  # Our side on the sidecar backend, otherwise on the same defaults.
  use Drab.Presence, otp_app: :drab_presence, backend: :sidecar
end

defmodule Bench.Adapter.Sidecar do
  @moduledoc false
  use Bench.Adapter.Ours, presence: Bench.SidecarPresence, name: "Drab.Presence (sidecar)"
end

if Code.ensure_loaded?(Phoenix.Presence) do
  defmodule Bench.PhoenixPresence do
    @moduledoc false
    # Phoenix.Presence on its defaults, on the same PubSub server.
    use Phoenix.Presence, otp_app: :drab_presence, pubsub_server: Bench.PubSub
  end
end

defmodule Bench.Adapter.Phoenix do
  @moduledoc false
  # Phoenix.Presence as Drab 0.10.5 uses it: count_users/1 and
  # count_connections/1 are Drab's own, computed from list/1.
  @behaviour Bench.Adapter
  @compile {:no_warn_undefined, [Bench.PhoenixPresence, Phoenix.PubSub]}
  alias Bench.PhoenixPresence, as: P

  @impl true
  def name, do: "Phoenix.Presence"

  @impl true
  def presence, do: P

  @impl true
  def start(_pubsub) do
    {:ok, _} = Supervisor.start_link([P], strategy: :one_for_one)
    :ok
  end

  @impl true
  def track(pid, topic, key, meta), do: P.track(pid, topic, key, meta)
  @impl true
  def untrack(pid, topic, key), do: P.untrack(pid, topic, key)
  @impl true
  def update(pid, topic, key, meta), do: P.update(pid, topic, key, meta)
  @impl true
  def list(topic), do: P.list(topic)

  # drab 0.10.5, Drab.Presence.count_users/1 and count_connections/1.
  @impl true
  def count_users(topic), do: topic |> P.list() |> Enum.count()

  @impl true
  def count_connections(topic) do
    topic |> P.list() |> Enum.map(fn {_key, %{metas: metas}} -> length(metas) end) |> Enum.sum()
  end

  @impl true
  def subscribe(topic), do: Phoenix.PubSub.subscribe(Bench.PubSub, topic)

  # The tracker's shard holds presences in an ETS table; its size is the
  # number of presences on every topic.
  @impl true
  def presences, do: :ets.info(values_table(), :size)

  @impl true
  def native_bytes, do: nil

  # Diffs leave the shard as one Task each (Phoenix.Presence's async_merge);
  # they are all out when the shard is idle and no task is left.
  @impl true
  def quiesce(timeout_ms \\ 600_000) do
    {shard, tasks} = processes()

    Bench.Harness.wait_until(
      fn -> Bench.Adapter.idle?(shard) and Task.Supervisor.children(tasks) == [] end,
      "Phoenix.Presence diffs to go out",
      timeout_ms,
      10
    )

    :ok
  end

  defp processes do
    [{_, shard, _, _}] = Supervisor.which_children(P)

    [tasks] =
      for {_, pid, :supervisor, [Task.Supervisor]} <-
            Supervisor.which_children(Module.concat(P, "Supervisor")),
          do: pid

    {shard, tasks}
  end

  defp values_table do
    case :persistent_term.get({__MODULE__, :values}, nil) do
      nil ->
        {shard, _} = processes()
        table = :sys.get_state(shard).presences.values
        :persistent_term.put({__MODULE__, :values}, table)
        table

      table ->
        table
    end
  end
end
