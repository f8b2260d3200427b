defmodule Drab.Presence.Setup do
  @moduledoc false
  # Setup mistakes that would otherwise be silent, found when the
  # :drab_presence application starts, each with what to do about it.

  require Logger

  @doc """
  Logs an error for each problem `problems/1` finds. Never raises: a
  misconfigured presence must not keep the rest of the app from booting.
  """
  @spec log_problems() :: :ok
  def log_problems do
    Enum.each(problems(), &Logger.error/1)
  end

  @doc """
  The setup problems of this node, as messages. `env` overrides what is
  looked up, for tests: `:presence_module` (the module named
  `Drab.Presence` on the code path), `:drab_loaded?` (Drab is on the code
  path) and `:presence_config` (`config :drab, :presence`).
  """
  @spec problems(keyword()) :: [String.t()]
  def problems(env \\ []) do
    presence_module = Keyword.get(env, :presence_module, Drab.Presence)
    drab_loaded? = Keyword.get_lazy(env, :drab_loaded?, fn -> Code.ensure_loaded?(Drab.Config) end)
    config = Keyword.get_lazy(env, :presence_config, &Drab.Presence.Config.presence/0)

    [
      drab_compiled_its_own(presence_module),
      true_config_with_drab(config, drab_loaded?),
      configured_module(config),
      configured_endpoint(config)
    ]
    |> Enum.reject(&is_nil/1)
  end

  defp drab_compiled_its_own(presence_module) do
    if Code.ensure_loaded?(presence_module) and
         not function_exported?(presence_module, :__presence_options__, 0) do
      "#{inspect(presence_module)} on this node is Drab's own module, not drab_presence's " <>
        "(loaded from #{:code.which(presence_module)}): Drab compiles its Drab.Presence " <>
        "when `config :drab, :presence` is set while Drab is compiled. Move that line to " <>
        "config/runtime.exs and rebuild Drab (mix deps.compile drab --force); Drab still " <>
        "calls start/2 and stop/2 at run time."
    end
  end

  defp true_config_with_drab(true, true = _drab_loaded?) do
    "`config :drab, :presence, true` makes every Drab page fail in Drab 0.10 " <>
      "(Drab.Config reads the presence config as a keyword list). Use a keyword list " <>
      "instead: `config :drab, :presence, id: []` tracks browser ids, as `true` does."
  end

  defp true_config_with_drab(_config, _drab_loaded?), do: nil

  defp configured_module(config) when is_list(config) do
    case Keyword.fetch(config, :module) do
      {:ok, module} when is_atom(module) ->
        cond do
          not Code.ensure_loaded?(module) ->
            "`config :drab, :presence, module: #{inspect(module)}`: no such module is loaded."

          not function_exported?(module, :__presence_options__, 0) ->
            "`config :drab, :presence, module: #{inspect(module)}`: the module does not " <>
              "`use Drab.Presence`."

          true ->
            nil
        end

      {:ok, other} ->
        "`config :drab, :presence, module: #{inspect(other)}`: expected a module."

      :error ->
        nil
    end
  end

  defp configured_module(_config), do: nil

  defp configured_endpoint(config) when is_list(config) do
    case Keyword.get(config, :endpoint) do
      nil ->
        nil

      endpoint ->
        if Application.get_env(:drab, endpoint) == nil do
          "`config :drab, :presence, endpoint: #{inspect(endpoint)}`: Drab has no config for " <>
            "that endpoint (`config :drab, #{inspect(endpoint)}, otp_app: ...`), so diffs " <>
            "cannot find its pubsub server."
        end
    end
  end

  defp configured_endpoint(_config), do: nil
end
