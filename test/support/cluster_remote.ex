defmodule Drab.Presence.ClusterRemote do
  @moduledoc false
  # What the cluster tests run on each node (the test node and its :peer
  # nodes, which load this module from the same ebin): a presence module,
  # processes that track with it, and dashboards that rebuild a topic from
  # its presence_diffs as phoenix.js does.

  @doc "Defines `module` as `use Drab.Presence` on this node (once) and starts it, unlinked."
  @spec start(module(), keyword()) :: :ok
  def start(module, opts) do
    unless Code.ensure_loaded?(module) do
      Code.compile_string("""
      defmodule #{inspect(module)} do
        use Drab.Presence, otp_app: :drab_presence
      end
      """)
    end

    {:ok, pid} = module.start_link(opts)
    Process.unlink(pid)
    :ok
  end

  @doc "Starts a Phoenix.PubSub server named `name` on this node, unlinked."
  @spec start_pubsub(atom()) :: :ok
  def start_pubsub(name) do
    # Not a dependency: found on ERL_LIBS, so not started with the suite.
    {:ok, _} = Application.ensure_all_started(:phoenix_pubsub)
    {:ok, pid} = Supervisor.start_link([{Phoenix.PubSub, name: name}], strategy: :one_for_one)
    Process.unlink(pid)
    :ok
  end

  @doc """
  A process of this node present under each of `keys` on `topic`; it lives
  until sent `:stop` (or killed), and untracks a key when sent `{:untrack, key}`.
  """
  @spec owner(module(), String.t(), [String.t()], map()) :: pid()
  def owner(module, topic, keys, meta) do
    caller = self()

    pid =
      spawn(fn ->
        for key <- keys, do: {:ok, _} = module.track(self(), topic, key, meta)
        send(caller, {:tracked, self()})
        owner_loop(module, topic)
      end)

    receive do
      {:tracked, ^pid} -> pid
    after
      30_000 -> raise "owner did not track in time"
    end
  end

  defp owner_loop(module, topic) do
    receive do
      {:untrack, key, from} ->
        :ok = module.untrack(self(), topic, key)
        send(from, {:untracked, key})
        owner_loop(module, topic)

      :stop ->
        :ok
    end
  end

  @doc "Untracks `key` in `owner` and waits until it has."
  @spec untrack(pid(), String.t()) :: :ok
  def untrack(owner, key) do
    send(owner, {:untrack, key, self()})

    receive do
      {:untracked, ^key} -> :ok
    after
      5_000 -> raise "owner did not untrack in time"
    end
  end

  @doc "A process that syncs from `list/1` then applies every presence_diff on `topic`."
  @spec dashboard(module(), String.t()) :: pid()
  def dashboard(module, topic) do
    caller = self()

    pid =
      spawn(fn ->
        :ok = module.subscribe(topic)
        send(caller, {:subscribed, self()})
        dashboard_loop(module.list(topic), MapSet.new())
      end)

    receive do
      {:subscribed, ^pid} -> pid
    after
      5_000 -> raise "dashboard did not subscribe in time"
    end
  end

  defp dashboard_loop(view, ever_left) do
    receive do
      %{event: "presence_diff", payload: payload} ->
        ever_left = Enum.into(Map.keys(payload.leaves), ever_left)
        dashboard_loop(Drab.PresenceCase.sync_diff(view, payload), ever_left)

      {:view, from} ->
        send(from, {:view, self(), view})
        dashboard_loop(view, ever_left)

      {:ever_left, from} ->
        send(from, {:ever_left, self(), ever_left})
        dashboard_loop(view, ever_left)
    end
  end

  @doc "Every key a leave on the dashboard's topic has named so far."
  @spec ever_left(pid()) :: MapSet.t()
  def ever_left(dashboard) do
    send(dashboard, {:ever_left, self()})

    receive do
      {:ever_left, ^dashboard, keys} -> keys
    after
      5_000 -> raise "dashboard did not answer"
    end
  end

  @doc "What `dashboard` has rebuilt so far."
  @spec view(pid()) :: map()
  def view(dashboard) do
    send(dashboard, {:view, self()})

    receive do
      {:view, ^dashboard, view} -> view
    after
      5_000 -> raise "dashboard did not answer"
    end
  end

  @doc "The OS pid of `module`'s sidecar on this node (backend: :sidecar)."
  @spec sidecar_os_pid(module()) :: non_neg_integer() | nil
  def sidecar_os_pid(module) do
    %{table: table} = Drab.Presence.Runtime.fetch!(module)
    Drab.Presence.Backend.Sidecar.os_pid(table)
  end

  @doc "`{users, connections, list}` of `topic` on this node."
  @spec summary(module(), String.t()) :: {non_neg_integer(), non_neg_integer(), map()}
  def summary(module, topic) do
    {module.count_users(topic), module.count_connections(topic), module.list(topic)}
  end
end
