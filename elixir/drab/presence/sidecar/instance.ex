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

  alias Drab.Presence.Sidecar.{Monitors, PortOwner, Table}

  @doc false
  @spec start_link(Table.t(), keyword()) :: Supervisor.on_start()
  def start_link(%Table{} = table, opts), do: Supervisor.start_link(__MODULE__, {table, opts})

  @impl true
  def init({table, opts}) do
    monitors =
      for index <- 0..(tuple_size(table.monitors) - 1) do
        Supervisor.child_spec({Monitors, {table, index}}, id: {Monitors, index})
      end

    children =
      [%{id: :keeper, start: {__MODULE__, :start_keeper, [table]}}] ++
        monitors ++ [{PortOwner, {table, opts}}]

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 20, max_seconds: 5)
  end

  @doc false
  # Owns the sidecar table's ETS tables (made public by it) and does nothing else,
  # so that they outlive any crash of the processes that write them.
  @spec start_keeper(Table.t()) :: {:ok, pid()}
  def start_keeper(table) do
    parent = self()

    pid =
      spawn_link(fn ->
        Table.create_tables(table)
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
