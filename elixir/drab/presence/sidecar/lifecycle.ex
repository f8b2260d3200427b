defmodule Drab.Presence.Sidecar.Lifecycle do
  @moduledoc false
  # One sidecar OS process behind a port, as the port owner starts it:
  # open, hello (the protocol version), configure, the port owner's own
  # synchronous requests, close. What goes into a new sidecar after that
  # is Recovery's.
  require Drab.Presence.Sidecar.Wire

  alias Drab.Presence.Sidecar.{Table, Wire}

  @handshake_timeout 10_000

  @doc """
  Opens a new sidecar for `table` and checks its protocol version, then
  configures it as the table is: `{:ok, port}`, or `{:error, message}`
  (the port closed).
  """
  @spec open(Table.t()) :: {:ok, port()} | {:error, String.t()}
  def open(%Table{} = table) do
    port =
      Port.open({:spawn_executable, table.path}, [
        :binary,
        {:packet, 4},
        :exit_status,
        :use_stdio
      ])

    with :ok <- handshake(port),
         :ok <- sync(port, :configure, Wire.configure_body(Table.settings(table))) do
      {:ok, port}
    else
      {:error, message} ->
        close(port)
        {:error, message}
    end
  end

  @doc "Checks that the sidecar behind `port` speaks our protocol version."
  @spec handshake(port()) :: :ok | {:error, String.t()}
  def handshake(port) do
    case sync(port, :hello, ["DRPS", <<Wire.version()::16>>]) do
      :ok ->
        :ok

      {:error, message} ->
        {:error,
         "the presence sidecar (#{state_path(port)}) did not accept protocol version " <>
           "#{Wire.version()}: #{message}"}
    end
  end

  defp state_path(port) do
    case Port.info(port, :os_pid) do
      {:os_pid, os_pid} -> "OS pid #{os_pid}"
      nil -> inspect(port)
    end
  end

  @doc """
  A request of the port owner's own, answered before anything else moves:
  `:ok`, or `{:error, message}`.
  """
  @spec sync(port(), atom(), iodata()) :: :ok | {:error, String.t()}
  def sync(port, name, body) do
    with {:ok, _body} <- sync_body(port, name, body), do: :ok
  end

  @doc "`sync/3` that answers the reply's body: `{:ok, body}`."
  @spec sync_body(port(), atom(), iodata()) :: {:ok, binary()} | {:error, String.t()}
  def sync_body(port, name, body) do
    op = Wire.op(name)
    id = :erlang.unique_integer([:positive])
    Port.command(port, Wire.request(name, id, 0, body))

    receive do
      {^port, {:data, <<^op, ^id::64, 0::64, Wire.status(:ok), rest::binary>>}} ->
        {:ok, rest}

      {^port, {:data, <<_op, _id::64, _::64, status, message::binary>>}}
      when status in [Wire.status(:bad_frame), Wire.status(:refused)] ->
        {:error, message}

      {^port, {:exit_status, status}} ->
        {:error, "the sidecar exited with status #{status}"}
    after
      @handshake_timeout -> {:error, "no answer from the sidecar in #{@handshake_timeout} ms"}
    end
  end

  @doc "Closes `port`, whether or not the sidecar already exited."
  @spec close(port()) :: :ok
  def close(port) do
    Port.close(port)
    :ok
  rescue
    # Already closed: the sidecar exited first.
    ArgumentError -> :ok
  end
end
