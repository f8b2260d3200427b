defmodule Drab.Presence.Config do
  @moduledoc false
  # Drab's presence config, read as drab 0.10.5's Drab.Config reads it, and
  # the browser id resolution of its Drab.Presence.client_id/1.

  @typedoc "Anything with Phoenix.Socket's `topic`, `channel_pid` and `assigns`."
  @type socket :: %{
          required(:topic) => String.t(),
          required(:channel_pid) => pid(),
          required(:assigns) => map(),
          optional(atom()) => any()
        }

  @doc "`config :drab, :presence, ...`: `false` when unset."
  @spec presence() :: boolean() | keyword()
  def presence, do: Application.get_env(:drab, :presence, false)

  @doc "Drab's `Drab.Config.get(:presence, key)` for `:id`, `:module` and `:endpoint`."
  @spec get(:id | :module | :endpoint) :: term()
  def get(:id), do: from_list(:id, session: :user_id)
  def get(:module), do: from_list(:module, Drab.Presence)
  def get(:endpoint), do: from_list(:endpoint, nil)

  defp from_list(key, default) do
    case presence() do
      options when is_list(options) -> Keyword.get(options, key, default)
      _ when key == :module -> default
      _ -> nil
    end
  end

  @doc "Options for `Drab.Presence` itself: our keys from the config list."
  @spec options() :: keyword()
  def options do
    case presence() do
      options when is_list(options) -> Keyword.drop(options, [:id, :module, :endpoint])
      _ -> []
    end
  end

  @doc """
  The presence key of a socket, exactly as drab 0.10.5 resolves it: the
  configured store and/or session key, in the configured order, falling back
  to the browser id in `assigns.__client_id`.
  """
  @spec client_id(socket()) :: term() | no_return()
  def client_id(%{assigns: assigns}) do
    from_config =
      case get(:id) do
        [store: store_key, session: session_key] ->
          Map.get(assigns[:__store], store_key, nil) || session(assigns, session_key)

        [session: session_key, store: store_key] ->
          session(assigns, session_key) || Map.get(assigns[:__store], store_key, nil)

        [session: session_key] ->
          session(assigns, session_key)

        [store: store_key] ->
          Map.get(assigns[:__store], store_key, nil)

        session_key when is_atom(session_key) ->
          session(assigns, session_key)

        _ ->
          nil
      end

    from_config || assigns[:__client_id] || raise "can't get the browser id"
  end

  defp session(assigns, key), do: assigns[:__session] && assigns[:__session][key]

  @doc """
  The pubsub server of the Drab endpoint (the configured `endpoint:`, or
  the only one Drab has config for), or `nil`.

  Drab keeps endpoint settings under `config :drab, MyEndpoint, otp_app: app`;
  the endpoint's own config names its pubsub server (`pubsub_server:` since
  Phoenix 1.5, `pubsub: [name: ...]` before). No endpoint, no pubsub: the
  built-in subscription is used instead of raising as Drab does.
  """
  @spec endpoint_pubsub_server() :: atom() | nil
  def endpoint_pubsub_server do
    with endpoint when not is_nil(endpoint) <- get(:endpoint) || single_endpoint(),
         {:ok, app} <- :drab |> Application.get_env(endpoint, []) |> Keyword.fetch(:otp_app),
         config when is_list(config) <- Application.get_env(app, endpoint) do
      config[:pubsub_server] || get_in(config, [:pubsub, :name])
    else
      _ -> nil
    end
  end

  defp single_endpoint do
    endpoints =
      for {key, _} <- Application.get_all_env(:drab),
          is_atom(key) and String.starts_with?(Atom.to_string(key), "Elixir."),
          do: key

    case endpoints do
      [endpoint] -> endpoint
      _ -> nil
    end
  end
end
