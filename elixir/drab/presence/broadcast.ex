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
          | {:phoenix_pubsub_1, pubsub :: atom(), message :: module()}
          | {:builtin, registry :: atom(), message :: module()}

  @doc false
  @spec delivery(module(), atom() | nil) :: delivery()
  def delivery(presence_module, pubsub_server) do
    cond do
      # Exactly what Phoenix.Presence does: a node-local broadcast through
      # the channel fastlane (Phoenix 1.5 and later).
      pubsub_server && exported?(Phoenix.Channel.Server, :local_broadcast, 4) ->
        {:phoenix_channel, pubsub_server}

      pubsub_server && exported?(Phoenix.PubSub, :local_broadcast, 3) ->
        {:phoenix_pubsub, pubsub_server}

      # phoenix_pubsub 1.x, as Drab 0.10 pins it (Phoenix 1.3, 1.4): what
      # Phoenix.Presence 1.4 does, a broadcast to this node only.
      pubsub_server && exported?(Phoenix.PubSub, :direct_broadcast, 4) ->
        message =
          if Code.ensure_loaded?(Phoenix.Socket.Broadcast),
            do: Phoenix.Socket.Broadcast,
            else: __MODULE__

        {:phoenix_pubsub_1, pubsub_server, message}

      # Decided once: looking for a module that is not there on every
      # broadcast would be a code server call each time.
      Code.ensure_loaded?(Phoenix.Socket.Broadcast) ->
        {:builtin, subscribers(presence_module), Phoenix.Socket.Broadcast}

      true ->
        {:builtin, subscribers(presence_module), __MODULE__}
    end
  end

  defp exported?(module, function, arity),
    do: Code.ensure_loaded?(module) and function_exported?(module, function, arity)

  @doc false
  @spec subscribers(module()) :: atom()
  def subscribers(presence_module), do: Module.concat(presence_module, Subscribers)

  @doc false
  @spec local_broadcast(delivery(), String.t(), map()) :: :ok | {:error, term()}
  def local_broadcast({:phoenix_channel, pubsub}, topic, payload) do
    Phoenix.Channel.Server.local_broadcast(pubsub, topic, "presence_diff", payload)
  end

  def local_broadcast({:phoenix_pubsub, pubsub}, topic, payload) do
    Phoenix.PubSub.local_broadcast(pubsub, topic, message(__MODULE__, topic, payload))
  end

  def local_broadcast({:phoenix_pubsub_1, pubsub, message_module}, topic, payload) do
    message = message(message_module, topic, payload)
    Phoenix.PubSub.direct_broadcast(Phoenix.PubSub.node_name(pubsub), pubsub, topic, message)
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

  def subscribe({:phoenix_pubsub_1, pubsub, _message_module}, topic),
    do: Phoenix.PubSub.subscribe(pubsub, topic)

  def subscribe({_phoenix, pubsub}, topic), do: Phoenix.PubSub.subscribe(pubsub, topic)

  @doc false
  @spec unsubscribe(delivery(), String.t()) :: :ok
  def unsubscribe({:builtin, registry, _message_module}, topic),
    do: Registry.unregister(registry, topic)

  def unsubscribe({:phoenix_pubsub_1, pubsub, _message_module}, topic),
    do: Phoenix.PubSub.unsubscribe(pubsub, topic)

  def unsubscribe({_phoenix, pubsub}, topic), do: Phoenix.PubSub.unsubscribe(pubsub, topic)

  defp message(module, topic, payload),
    do: struct(module, topic: topic, event: "presence_diff", payload: payload)
end
