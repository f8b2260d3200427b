defmodule Drab.Presence.Setup do
  @moduledoc false
  # Setup mistakes that would otherwise be silent, found when the
  # :drab_presence application starts, each with what to do about it.

  require Logger

  @doc """
  Makes `config :drab, :presence, true`, the first line of Drab's own docs,
  a config Drab 0.10 can read: Drab reads it as a keyword list, and `true`
  makes every Drab page fail. It becomes `[id: []]`, which means what
  `true` means (presences keyed by browser id), and says so at info level.
  Run when the :drab_presence application starts, before the app's own
  tree and before Drab serves a page.
  """
  @spec normalize_config() :: :ok
  def normalize_config do
    if Application.get_env(:drab, :presence) == true do
      Application.put_env(:drab, :presence, id: [])

      Logger.info(
        "`config :drab, :presence, true` is read as `config :drab, :presence, id: []` " <>
          "(presences keyed by browser id, as `true` means): Drab 0.10 reads this " <>
          "config as a keyword list, and fails every page on `true`"
      )
    end

    :ok
  end

  @doc """
  Logs an error for each problem `problems/1` finds. Never raises: a
  misconfigured presence must not keep the rest of the app from booting.
  """
  @spec log_problems() :: :ok
  def log_problems do
    Enum.each(problems(), &Logger.error/1)
  end

  @doc """
  A warning for a presence module started without a `:pubsub_server` in
  an app that has Phoenix (`phoenix?`): its diffs then go to the built-in
  registry, and Phoenix channels never hear of a join or a leave. `nil`
  when there is nothing to say, or when `pubsub_server: nil` was given:
  the built-in registry is then what is meant. `layers` are the options
  as given (see `Drab.Presence.Options.validate!/1`).
  """
  @spec pubsub_problem(module(), [keyword()], boolean()) :: String.t() | nil
  def pubsub_problem(module, layers, phoenix? \\ Code.ensure_loaded?(Phoenix.Channel)) do
    if phoenix? and not Enum.any?(layers, &Keyword.has_key?(&1, :pubsub_server)) do
      fix =
        if module == Drab.Presence,
          do:
            "name the endpoint whose pubsub carries them (`config :drab, :presence, " <>
              "endpoint: MyAppWeb.Endpoint`) or the server (`pubsub_server: MyApp.PubSub`)",
          else:
            "give it one: `use Drab.Presence, otp_app: ..., pubsub_server: MyApp.PubSub`, " <>
              "or `config :my_app, #{inspect(module)}, pubsub_server: MyApp.PubSub`"

      "#{inspect(module)} has no :pubsub_server, so its presence_diff broadcasts go to " <>
        "subscribe/1's built-in registry only: Phoenix channels will not hear of joins " <>
        "and leaves. To reach them, " <>
        fix <>
        " (`pubsub_server: nil` says the " <>
        "built-in registry is meant, and silences this)."
    end
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

  # Only when `true` was set after this application started (normalize_config/0
  # has not seen it).
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
