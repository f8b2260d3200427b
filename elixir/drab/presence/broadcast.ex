defmodule Drab.Presence.Broadcast do
  @moduledoc """
  The message subscribers receive when Phoenix is not on the code path.

  Its fields are those of `Phoenix.Socket.Broadcast`, so code that matches
  `%{event: "presence_diff", payload: payload}` works with either. When
  Phoenix is loaded, subscribers get a real `%Phoenix.Socket.Broadcast{}`.
  """

  @enforce_keys [:topic, :event, :payload]
  defstruct [:topic, :event, :payload]

  @type t :: %__MODULE__{topic: String.t(), event: String.t(), payload: map()}

  @compile {:no_warn_undefined, [Phoenix.PubSub, Phoenix.Channel.Server]}

  @typedoc false
  @type delivery ::
          {:phoenix_channel, pubsub :: atom()}
          | {:phoenix_pubsub, pubsub :: atom()}
          | {:builtin, registry :: atom(), message :: module()}

  @doc false
  @spec delivery(module(), atom() | nil) :: delivery()
  def delivery(presence_module, pubsub_server) do
    cond do
      # Exactly what Phoenix.Presence does: a node-local broadcast through
      # the channel fastlane.
      pubsub_server && Code.ensure_loaded?(Phoenix.Channel.Server) ->
        {:phoenix_channel, pubsub_server}

      pubsub_server && Code.ensure_loaded?(Phoenix.PubSub) ->
        {:phoenix_pubsub, pubsub_server}

      # Decided once: looking for a module that is not there on every
      # broadcast would be a code server call each time.
      Code.ensure_loaded?(Phoenix.Socket.Broadcast) ->
        {:builtin, subscribers(presence_module), Phoenix.Socket.Broadcast}

      true ->
        {:builtin, subscribers(presence_module), __MODULE__}
    end
  end

  @doc false
  @spec subscribers(module()) :: atom()
  def subscribers(presence_module), do: Module.concat(presence_module, Subscribers)

  @doc false
  @spec local_broadcast(delivery(), String.t(), map()) :: :ok
  def local_broadcast({:phoenix_channel, pubsub}, topic, payload) do
    Phoenix.Channel.Server.local_broadcast(pubsub, topic, "presence_diff", payload)
  end

  def local_broadcast({:phoenix_pubsub, pubsub}, topic, payload) do
    Phoenix.PubSub.local_broadcast(pubsub, topic, message(__MODULE__, topic, payload))
  end

  def local_broadcast({:builtin, registry, message_module}, topic, payload) do
    message = message(message_module, topic, payload)

    Registry.dispatch(registry, topic, fn subscribers ->
      for {pid, _} <- subscribers, do: send(pid, message)
    end)
  end

  @doc false
  @spec subscribe(delivery(), String.t()) :: :ok | {:error, term()}
  def subscribe({:builtin, registry, _message_module}, topic) do
    case Registry.register(registry, topic, nil) do
      {:ok, _} -> :ok
      {:error, _} = error -> error
    end
  end

  def subscribe({_phoenix, pubsub}, topic), do: Phoenix.PubSub.subscribe(pubsub, topic)

  @doc false
  @spec unsubscribe(delivery(), String.t()) :: :ok
  def unsubscribe({:builtin, registry, _message_module}, topic),
    do: Registry.unregister(registry, topic)

  def unsubscribe({_phoenix, pubsub}, topic), do: Phoenix.PubSub.unsubscribe(pubsub, topic)

  defp message(module, topic, payload),
    do: struct(module, topic: topic, event: "presence_diff", payload: payload)
end
