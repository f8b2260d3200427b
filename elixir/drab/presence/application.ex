defmodule Drab.Presence.Application do
  @moduledoc false
  # Starts nothing of its own (presence modules go in the app's tree); it
  # is here to report setup mistakes when the app boots.
  use Application

  @impl true
  def start(_type, _args) do
    Drab.Presence.Setup.log_problems()
    Supervisor.start_link([], strategy: :one_for_one, name: __MODULE__)
  end
end
