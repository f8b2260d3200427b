defmodule Drab.Presence.Runtime do
  @moduledoc false
  # What callers of a presence module need to reach its table without a
  # process hop: the backend, the table handle, and how diffs are delivered.
  # Kept in :persistent_term so that it outlives any process of the package:
  # a crashed or restarted dispatcher finds the same table, with every
  # presence of a live process still in it.

  alias Drab.Presence.{Backend, Broadcast}

  @enforce_keys [:backend, :table, :delivery]
  defstruct [:backend, :table, :delivery]

  @type t :: %__MODULE__{backend: module(), table: Backend.handle(), delivery: Broadcast.delivery()}

  @doc "The runtime of a started presence module. Raises `ArgumentError` before its first start."
  @spec fetch!(module()) :: t()
  def fetch!(module) do
    case :persistent_term.get({__MODULE__, module}, nil) do
      %__MODULE__{} = runtime ->
        runtime

      nil ->
        raise ArgumentError,
              "#{inspect(module)} is not started: add #{inspect(module)} to your " <>
                "application's supervision tree before tracking or listing presences"
    end
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
