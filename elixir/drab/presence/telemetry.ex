defmodule Drab.Presence.Telemetry do
  @moduledoc false
  # `:telemetry` events, when the app has `:telemetry` (every Phoenix app
  # does). It is no dependency of ours: whether it is there is decided when
  # a presence module starts (`refresh/0`), and kept in :persistent_term,
  # so an event costs one lookup, not a code server call, and nothing at
  # all without telemetry. The events are listed in `Drab.Presence`'s
  # "Telemetry" section.

  @compile {:no_warn_undefined, :telemetry}

  @enabled {__MODULE__, :enabled?}

  @doc """
  Decides whether events are emitted: `:telemetry` is loaded and its
  application started (before it starts, `:telemetry.execute/3` logs a
  warning per event). Called by every presence module's start, after the
  app's dependencies have started.
  """
  @spec refresh() :: boolean()
  def refresh do
    enabled? =
      Code.ensure_loaded?(:telemetry) and
        List.keymember?(Application.started_applications(), :telemetry, 0)

    # A write to :persistent_term scans every process: only on a change.
    if :persistent_term.get(@enabled, nil) != enabled?, do: :persistent_term.put(@enabled, enabled?)
    enabled?
  end

  @doc "Whether events are emitted (see `refresh/0`)."
  @spec enabled?() :: boolean()
  def enabled?, do: :persistent_term.get(@enabled, false)

  @doc "Emits `[:drab_presence | event]` when `enabled?/0`."
  @spec execute([atom()], map(), map()) :: :ok
  def execute(event, measurements, metadata) do
    if enabled?(), do: :telemetry.execute([:drab_presence | event], measurements, metadata)
    :ok
  end

  @doc "Presences in a part's joins or leaves, as `%{key => %{metas: metas}}`."
  @spec presences(map()) :: non_neg_integer()
  def presences(grouped) do
    Enum.reduce(grouped, 0, fn {_key, %{metas: metas}}, n -> n + length(metas) end)
  end
end
