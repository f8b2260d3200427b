defmodule Drab.Presence.Runtime do
  @moduledoc false
  # What callers of a presence module need to reach its table without a
  # process hop: the backend, the table handle, how diffs are delivered, and
  # the supervisor of the running module. Kept in :persistent_term so that
  # it outlives any process of the package: a crashed or restarted
  # dispatcher, or the next start of a stopped module, finds the same table,
  # with every presence of a live process still in it.

  alias Drab.Presence.{Backend, Broadcast}

  @enforce_keys [:backend, :table, :delivery]
  defstruct [:backend, :table, :delivery, :supervisor]

  @type t :: %__MODULE__{
          backend: module(),
          table: Backend.handle(),
          delivery: Broadcast.delivery(),
          supervisor: pid() | nil
        }

  @doc """
  The runtime of a running presence module. Raises `ArgumentError` before
  its first start, and after a stop until it is started again: the table
  and its presences outlive the stop, but no dispatcher would deliver the
  diff of a write made meanwhile, so none is taken.
  """
  @spec fetch!(module()) :: t()
  def fetch!(module) do
    # Running means its supervisor is alive: Process.alive?/1 of a local
    # pid is a lock-free lookup, ~7 ns on every call, where
    # Process.whereis/1 of its name takes the name table's lock (~50 ns),
    # and a flag that its processes set and clear would stay set after a
    # kill (README, "A stopped presence module").
    case :persistent_term.get({__MODULE__, module}, nil) do
      %__MODULE__{supervisor: supervisor} = runtime when is_pid(supervisor) ->
        if Process.alive?(supervisor), do: runtime, else: not_started!(module)

      _never_started ->
        not_started!(module)
    end
  end

  defp not_started!(module) do
    raise ArgumentError,
          "#{inspect(module)} is not started: add #{inspect(module)} to your application's " <>
            "supervision tree before tracking, listing or subscribing (a stopped module keeps " <>
            "its presences for its next start)"
  end

  @doc """
  Marks `module` running under `supervisor` (Drab.Presence.Supervisor's
  init): from now on until that process exits, `fetch!/1` answers. One
  `:persistent_term` write per start.
  """
  @spec running(module(), pid()) :: :ok
  def running(module, supervisor) do
    runtime = :persistent_term.get({__MODULE__, module})
    put(module, %{runtime | supervisor: supervisor})
    :ok
  end

  @doc """
  The runtime of `module`, created on its first start and reused after: the
  table is never replaced. A restart applies the options that can change
  while the table lives, and refuses a change of backend with an
  `ArgumentError`.
  """
  @spec ensure(module(), keyword()) :: t()
  def ensure(module, opts) do
    backend = backend_module(Keyword.fetch!(opts, :backend))
    delivery = Broadcast.delivery(module, opts[:pubsub_server])

    case :persistent_term.get({__MODULE__, module}, nil) do
      nil ->
        table = backend.new(module, opts)
        put(module, %__MODULE__{backend: backend, table: table, delivery: delivery})

      %__MODULE__{backend: ^backend, table: table} = runtime ->
        :ok = backend.configure(table, opts)

        if runtime.delivery == delivery,
          do: runtime,
          else: put(module, %{runtime | delivery: delivery})

      %__MODULE__{backend: running} ->
        raise ArgumentError,
              "#{inspect(module)} cannot switch its :backend to #{inspect(opts[:backend])}: " <>
                "its table lives in #{inspect(running)} until the VM restarts, with every " <>
                "presence in it; restart the VM to change backends"
    end
  end

  defp put(module, runtime) do
    :persistent_term.put({__MODULE__, module}, runtime)
    runtime
  end

  defp backend_module(:nif), do: Drab.Presence.Backend.NIF
  defp backend_module(:sidecar), do: Drab.Presence.Backend.Sidecar
end
