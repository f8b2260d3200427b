# What the cluster bench runs on each presence node. bench/cluster.exs
# compiles this file once, on the coordinator, and loads the resulting
# binaries into every :peer node (:code.load_binary/3), so that all nodes
# run the very same code without a file of their own.

defmodule Bench.ClusterDrab do
  @moduledoc false
  # Our presence module, the same on every node. Options are given at start
  # (Bench.ClusterImpl.Ours.start/1).
  use Drab.Presence, otp_app: :drab_presence
end

if Code.ensure_loaded?(Phoenix.Presence) do
  defmodule Bench.ClusterPhoenix do
    @moduledoc false
    # Phoenix.Presence on its defaults (broadcast_period 1.5 s, down_period
    # 30 s), on a Phoenix.PubSub server started on every node.
    use Phoenix.Presence, otp_app: :drab_presence, pubsub_server: Bench.ClusterPubSub
  end
end

defmodule Bench.ClusterImpl do
  @moduledoc false
  # One presence implementation as the cluster bench drives it. Each runs on
  # its own fresh nodes; `start/1` runs on every node of the cluster.

  @doc "A label for the table."
  @callback name() :: String.t()
  @doc "`:ok`, or `{:unavailable, reason}` (shown in the table instead of figures)."
  @callback available() :: :ok | {:unavailable, String.t()}
  @doc "Starts the implementation on this node, unlinked from the caller."
  @callback start() :: :ok
  @callback track(pid(), String.t(), String.t(), map()) :: {:ok, term()} | {:error, term()}
  @doc "Connections on the topic as this node sees them: `count_connections/1`."
  @callback count_connections(String.t()) :: non_neg_integer()

  @doc "Starts `children` under a supervisor that outlives the calling (erpc) process."
  def start_unlinked(children) do
    {:ok, sup} = Supervisor.start_link(children, strategy: :one_for_one)
    Process.unlink(sup)
    :ok
  end

  @doc "Starts phoenix_pubsub and the bench's PubSub server (PG2 adapter, over distribution)."
  def start_pubsub do
    {:ok, _} = Application.ensure_all_started(:phoenix_pubsub)
    start_unlinked([{Phoenix.PubSub, name: Bench.ClusterPubSub}])
  end

  def phoenix?,
    do: Code.ensure_loaded?(Phoenix.Presence) and Code.ensure_loaded?(Phoenix.PubSub)
end

defmodule Bench.ClusterImpl.Phoenix do
  @moduledoc false
  # Real Phoenix.Presence. count_connections/1 is Drab 0.10.5's: the sum of
  # the metas of list/1.
  @behaviour Bench.ClusterImpl
  @compile {:no_warn_undefined, [Bench.ClusterPhoenix]}

  @impl true
  def name, do: "Phoenix.Presence"

  @impl true
  def available do
    if Bench.ClusterImpl.phoenix?(),
      do: :ok,
      else: {:unavailable, "Phoenix is not on the code path (ERL_LIBS)"}
  end

  @impl true
  def start do
    :ok = Bench.ClusterImpl.start_pubsub()
    Bench.ClusterImpl.start_unlinked([Bench.ClusterPhoenix])
  end

  @impl true
  def track(pid, topic, key, meta), do: Bench.ClusterPhoenix.track(pid, topic, key, meta)

  @impl true
  def count_connections(topic) do
    topic
    |> Bench.ClusterPhoenix.list()
    |> Enum.reduce(0, fn {_key, %{metas: metas}}, sum -> sum + length(metas) end)
  end
end

defmodule Bench.ClusterImpl.Ours do
  @moduledoc false
  # Drab.Presence in cluster mode: the same module started on every node.
  # THE place to wire cluster mode into the bench: available/0 detects it,
  # options/1 gives the start options of each transport. Assumed API (as on
  # main since e3d1971): `use Drab.Presence` plus `start_link/1` with
  # `cluster: :auto` (the default), replicating through `pubsub_server:` when
  # one is given and Phoenix.PubSub is loaded, else over OTP's :pg.
  @compile {:no_warn_undefined, [Drab.Presence.Cluster]}

  def name(:pubsub), do: "Drab.Presence (PubSub)"
  def name(:pg), do: "Drab.Presence (:pg)"
  def name(:pg_sidecar), do: "Drab.Presence (sidecar, :pg)"

  def available(transport) do
    cond do
      not (Code.ensure_loaded?(Drab.Presence.Cluster) and
               function_exported?(Drab.Presence.Cluster, :transport, 1)) ->
        {:unavailable, "cluster mode not available in this build"}

      transport == :pubsub and not Bench.ClusterImpl.phoenix?() ->
        {:unavailable, "Phoenix.PubSub is not on the code path (ERL_LIBS)"}

      Drab.Presence.Cluster.Transport.choose(options(transport)) != expected(transport) ->
        {:unavailable, "this build does not replicate over #{transport} with these options"}

      true ->
        :ok
    end
  end

  # On defaults, like Phoenix.Presence: diff_window 50 ms, heartbeat 1.5 s,
  # down_period 30 s (but nodedown purges at once where there is distribution).
  def options(:pubsub), do: [pubsub_server: Bench.ClusterPubSub, cluster: :auto]
  def options(:pg), do: [cluster: :auto]
  def options(:pg_sidecar), do: [cluster: :auto, backend: :sidecar]

  defp expected(:pubsub), do: {:pubsub, Bench.ClusterPubSub}
  defp expected(_pg), do: :pg

  def start(transport) do
    if transport == :pubsub, do: :ok = Bench.ClusterImpl.start_pubsub()
    # The sidecar runs under :drab_presence's own supervisor.
    {:ok, _} = Application.ensure_all_started(:drab_presence)
    {:ok, pid} = Bench.ClusterDrab.start_link(options(transport))
    Process.unlink(pid)
    :ok
  end

  def track(pid, topic, key, meta), do: Bench.ClusterDrab.track(pid, topic, key, meta)
  def count_connections(topic), do: Bench.ClusterDrab.count_connections(topic)
end

# One module per transport (and backend), so that the bench treats every
# column alike.
for transport <- [:pubsub, :pg, :pg_sidecar] do
  defmodule Module.concat(Bench.ClusterImpl.Ours, transport |> to_string() |> Macro.camelize()) do
    @moduledoc false
    @behaviour Bench.ClusterImpl
    @transport transport
    alias Bench.ClusterImpl.Ours

    @impl true
    def name, do: Ours.name(@transport)
    @impl true
    def available, do: Ours.available(@transport)
    @impl true
    def start, do: Ours.start(@transport)
    @impl true
    def track(pid, topic, key, meta), do: Ours.track(pid, topic, key, meta)
    @impl true
    def count_connections(topic), do: Ours.count_connections(topic)
  end
end

defmodule Bench.ClusterNode do
  @moduledoc false
  # Work done on one node, called by the coordinator with :erpc. Times are
  # OS system time in µs: the nodes share this machine's clock, whereas
  # each VM's monotonic time has its own offset.

  def now_us, do: :os.system_time(:microsecond)

  @doc "Quiets the node's logger and starts `impl` there."
  def start(impl) do
    :logger.set_primary_config(:level, :warning)
    impl.start()
  end

  @doc """
  Spawns `n` idle processes held by a group process (linked, so that killing
  the group ends them all), ready to be tracked. Returns the group.
  """
  def prepare(n) do
    caller = self()

    group =
      spawn(fn ->
        pids = for _ <- 1..n//1, do: spawn_link(fn -> receive(do: (:never -> :ok)) end)
        send(caller, {:prepared, self()})
        group_loop(pids)
      end)

    receive do
      {:prepared, ^group} -> group
    after
      120_000 -> raise "holders not spawned in time"
    end
  end

  defp group_loop(pids) do
    receive do
      {:pids, from} ->
        send(from, {:pids, self(), pids})
        group_loop(pids)
    end
  end

  @doc """
  Tracks every process of `group` under keys `prefix-i` on `topic`, from
  `callers` processes at once (as channel processes would track). Returns the
  time the last track returned.
  """
  def track(impl, group, topic, prefix, callers) do
    send(group, {:pids, self()})
    pids = receive(do: ({:pids, ^group, pids} -> pids))
    chunk = max(1, div(length(pids) + callers - 1, callers))

    pids
    |> Enum.with_index()
    |> Enum.chunk_every(chunk)
    |> Enum.map(fn part ->
      Task.async(fn ->
        for {pid, i} <- part do
          {:ok, _} = impl.track(pid, topic, "#{prefix}-#{i}", %{online_at: i})
        end
      end)
    end)
    |> Enum.each(&Task.await(&1, :infinity))

    now_us()
  end

  @doc """
  Spawns a watcher that polls `count_connections(topic)` until it equals
  `target`, then sends `{tag, node(), reached_us, polls}` to `reply_to`
  (`reached_us` is when that poll returned), or `{tag, node(), :timeout,
  last_count}` after `timeout_ms`. Between polls it sleeps 10 ms, or twice
  the last poll's duration when longer, so that the watcher takes at most a
  third of a scheduler from the system it watches.
  """
  def watch(impl, topic, target, reply_to, tag, timeout_ms) do
    spawn(fn ->
      deadline = now_us() + timeout_ms * 1_000
      watch_loop(impl, topic, target, reply_to, tag, deadline, 0)
    end)
  end

  defp watch_loop(impl, topic, target, reply_to, tag, deadline, polls) do
    started = now_us()
    count = impl.count_connections(topic)
    done = now_us()

    cond do
      count == target ->
        send(reply_to, {tag, node(), done, polls + 1})

      done > deadline ->
        send(reply_to, {tag, node(), :timeout, count})

      true ->
        Process.sleep(max(10, div(2 * (done - started), 1_000)))
        watch_loop(impl, topic, target, reply_to, tag, deadline, polls + 1)
    end
  end

  @doc """
  Bytes this node has sent over its distribution connections to `nodes`
  (the other presence nodes; the coordinator's own traffic is left out).
  """
  def dist_sent(nodes) do
    for {node, port} <- :erlang.system_info(:dist_ctrl), node in nodes, is_port(port) do
      case :inet.getstat(port, [:send_oct]) do
        {:ok, [send_oct: bytes]} -> bytes
        _ -> 0
      end
    end
    |> Enum.sum()
  end
end
