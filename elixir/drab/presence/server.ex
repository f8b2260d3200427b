defmodule Drab.Presence.Server do
  @moduledoc false
  # The processes of one presence module: the built-in subscriber registry
  # and the diff dispatcher. Neither holds presences, so either may restart
  # without losing any.
  use Supervisor

  alias Drab.Presence.{Broadcast, Dispatcher, Options}

  @doc false
  @spec start_link(module(), keyword()) :: Supervisor.on_start()
  def start_link(module, opts) do
    opts = Options.validate!(opts)
    Supervisor.start_link(__MODULE__, {module, opts}, name: module)
  end

  @impl true
  def init({module, opts}) do
    children = [
      {Registry, keys: :duplicate, name: Broadcast.subscribers(module)},
      {Dispatcher, {module, opts}}
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end
end
