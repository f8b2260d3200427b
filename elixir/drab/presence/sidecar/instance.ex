defmodule Drab.Presence.Sidecar.Instance do
  @moduledoc false
  # One sidecar table: a keeper of the BEAM-side state, a pool of owner
  # monitors and the port owner. Started under Drab.Presence.Application,
  # not under the presence module's supervisor: like the NIF's table, it
  # lives until the VM stops, whatever happens to the module's processes.
  #
  # one_for_one: the keeper holds the journal and never fails; a monitor
  # that crashes re-monitors its owners from the journal; a port owner that
  # crashes closes its port (the sidecar exits on EOF) and its successor
  # starts and replays a new one.
  use Supervisor

  alias Drab.Presence.Sidecar.{Handle, Monitors, PortOwner}

  @doc false
  @spec start_link(Handle.t(), keyword()) :: Supervisor.on_start()
  def start_link(%Handle{} = handle, opts), do: Supervisor.start_link(__MODULE__, {handle, opts})

  @impl true
  def init({handle, opts}) do
    monitors =
      for index <- 0..(tuple_size(handle.monitors) - 1) do
        Supervisor.child_spec({Monitors, {handle, index}}, id: {Monitors, index})
      end

    children =
      [%{id: :keeper, start: {__MODULE__, :start_keeper, [handle]}}] ++
        monitors ++ [{PortOwner, {handle, opts}}]

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 20, max_seconds: 5)
  end

  @doc false
  # Owns the handle's ETS tables (made public by it) and does nothing else,
  # so that they outlive any crash of the processes that write them.
  @spec start_keeper(Handle.t()) :: {:ok, pid()}
  def start_keeper(handle) do
    parent = self()

    pid =
      spawn_link(fn ->
        Handle.create_tables(handle)
        send(parent, {:tables, self()})
        Process.flag(:trap_exit, true)
        keep()
      end)

    receive do
      {:tables, ^pid} -> {:ok, pid}
    end
  end

  defp keep do
    receive do
      {:EXIT, _from, reason} when reason not in [:normal] -> exit(reason)
      _ -> keep()
    end
  end
end
