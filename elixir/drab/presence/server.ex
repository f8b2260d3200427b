defmodule Drab.Presence.Server do
  @moduledoc false
  # The processes of one presence module: the built-in subscriber registry
  # and the diff dispatcher. Neither holds presences (the table is the
  # runtime's), so either may restart without losing any, and neither needs
  # the other to restart with it: one_for_one. A restarted registry starts
  # without subscriptions; subscribers that monitor it subscribe again.
  use Supervisor

  alias Drab.Presence.{Broadcast, Dispatcher, Options, Runtime}

  @doc false
  @spec start_link(module(), keyword(), term()) :: Supervisor.on_start()
  def start_link(module, defaults, opts) do
    opts = Options.validate!(defaults, opts)
    # In the caller, so that a restart with options the running table
    # cannot take raises here, with the reason, not in a child's init.
    Runtime.ensure(module, opts)
    Supervisor.start_link(__MODULE__, {module, opts}, name: module)
  end

  @impl true
  def init({module, opts}) do
    children = [
      {Registry, keys: :duplicate, name: Broadcast.subscribers(module)},
      {Dispatcher, {module, opts}}
    ]

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 10, max_seconds: 5)
  end
end
