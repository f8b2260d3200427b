defmodule Drab.Presence.Supervisor do
  @moduledoc false
  # The processes of one presence module: the built-in subscriber registry
  # and the diff dispatcher. Neither holds presences (the table is the
  # runtime's), so either may restart without losing any, and neither needs
  # the other to restart with it: one_for_one. A restarted registry starts
  # without subscriptions; subscribers that monitor it subscribe again.
  use Supervisor

  alias Drab.Presence.Cluster.Transport

  alias Drab.Presence.{
    Broadcast,
    Callbacks,
    Cluster,
    Dispatcher,
    Options,
    Runtime,
    Setup,
    Telemetry
  }

  @doc false
  # `layers`: keyword lists of options, each over the ones before it.
  @spec start_link(module(), [keyword()]) :: Supervisor.on_start()
  def start_link(module, layers) do
    opts = Options.validate!(layers)
    if message = Setup.pubsub_problem(module, layers), do: :logger.warning(message)
    # After the app's dependencies have started: :telemetry is up by now.
    Telemetry.refresh()
    # Phoenix.Presence's check, raised here as options errors are.
    Callbacks.check!(module)
    # In the caller, so that a restart with options the running table
    # cannot take raises here, with the reason, not in a child's init.
    Runtime.ensure(module, opts)
    Supervisor.start_link(__MODULE__, {module, opts}, name: module)
  end

  @impl true
  def init({module, opts}) do
    # Before any child: the cluster process reads the runtime in its init.
    :ok = Runtime.running(module, self())
    subscribers = Broadcast.subscribers(module)

    children = [
      %{
        id: subscribers,
        start: {__MODULE__, :start_subscribers, [subscribers]},
        type: :supervisor
      },
      {Dispatcher, {module, opts}}
      | cluster_children(module, opts)
    ]

    # Before the dispatcher, which hands it every diff it broadcasts.
    children =
      if Callbacks.enabled?(module),
        do: List.insert_at(children, 1, {Callbacks, {module, opts}}),
        else: children

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 10, max_seconds: 5)
  end

  # Cluster mode: the :pg scope (OTP 23+) its cluster processes meet in,
  # then the cluster process, rest_for_one: a restarted scope has lost its
  # members, so the cluster process must join it again.
  defp cluster_children(module, opts) do
    scope =
      if Transport.choose(opts) == :pg and Code.ensure_loaded?(:pg),
        do: [%{id: :pg, start: {:pg, :start_link, [Transport.pg_scope(module)]}}],
        else: []

    if Transport.choose(opts) do
      children = scope ++ [{Cluster, {module, opts}}]

      [
        %{
          id: Cluster,
          type: :supervisor,
          start: {Supervisor, :start_link, [children, [strategy: :rest_for_one]]}
        }
      ]
    else
      []
    end
  end

  @doc false
  # A killed Registry keeps its name for a moment while its partitions shut
  # down, and a restart in that moment fails with :already_started: with no
  # delay between restarts, the supervisor would spend its whole restart
  # budget in that moment and give up. Wait for the old one instead.
  @spec start_subscribers(atom(), non_neg_integer()) :: Supervisor.on_start()
  def start_subscribers(name, tries \\ 10) do
    case Registry.start_link(keys: :duplicate, name: name) do
      {:error, reason} = error when tries > 0 ->
        case holder_of_name(reason) do
          nil ->
            error

          old ->
            await_exit(old, 100)
            start_subscribers(name, tries - 1)
        end

      started ->
        started
    end
  end

  # The registry, or one of its partitions, whose name is still taken:
  # `{:already_started, pid}`, possibly inside a failed child's reason.
  defp holder_of_name({:already_started, pid}) when is_pid(pid), do: pid

  defp holder_of_name(reason) when is_tuple(reason),
    do: reason |> Tuple.to_list() |> Enum.find_value(&holder_of_name/1)

  defp holder_of_name(_reason), do: nil

  defp await_exit(pid, timeout) do
    ref = Process.monitor(pid)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    after
      timeout -> Process.demonitor(ref, [:flush])
    end
  end
end
