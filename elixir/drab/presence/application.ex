defmodule Drab.Presence.Application do
  @moduledoc false
  # Starts nothing of its own (presence modules go in the app's tree, and
  # sidecars under this supervisor); it is here to mend and report setup
  # mistakes when the app boots, before the app's own tree starts.
  use Application

  @impl true
  def start(_type, _args) do
    Drab.Presence.Setup.normalize_config()
    Drab.Presence.Setup.log_problems()
    Supervisor.start_link([], strategy: :one_for_one, name: __MODULE__)
  end
end
