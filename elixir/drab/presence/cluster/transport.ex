defmodule Drab.Presence.Cluster.Transport do
  @moduledoc false
  # How a cluster process reaches the same presence module's cluster
  # processes on other nodes: a Phoenix.PubSub server when one is
  # configured (every adapter works, distribution or not), else OTP's :pg
  # (:pg2 on OTP 22) over Erlang distribution. Peers are found as the app's
  # nodes already find each other; a cluster process only talks to the
  # members of its group. Messages go as they are given: what they say is
  # Drab.Presence.Cluster's.

  @compile {:no_warn_undefined, [Phoenix.PubSub]}

  @typedoc "What `join/2` returns, and every other function takes."
  @type t :: {:pubsub, atom(), binary()} | {:pg, atom(), module()} | {:pg2, term()} | nil

  @doc """
  How `module` replicates with these options: `{:pubsub, server}`, `:pg`, or
  `nil` when cluster mode is off.
  """
  @spec choose(keyword()) :: {:pubsub, atom()} | :pg | nil
  def choose(opts) do
    cond do
      opts[:cluster] == false -> nil
      opts[:pubsub_server] && Code.ensure_loaded?(Phoenix.PubSub) -> {:pubsub, opts[:pubsub_server]}
      true -> :pg
    end
  end

  @doc "The :pg scope `module`'s cluster processes meet in."
  @spec pg_scope(module()) :: atom()
  def pg_scope(module), do: Module.concat(module, ClusterScope)

  @doc "Makes the calling process a member of `module`'s group on the transport `choose/1` chose."
  @spec join({:pubsub, atom()} | :pg | nil, module()) :: t()
  def join(nil, _module), do: nil

  def join({:pubsub, server}, module) do
    topic = "drab_presence_cluster:" <> inspect(module)
    :ok = Phoenix.PubSub.subscribe(server, topic)
    {:pubsub, server, topic}
  end

  def join(:pg, module) do
    if Code.ensure_loaded?(:pg) do
      scope = pg_scope(module)
      # By name: OTP 22 has no :pg (the API check keeps us to OTP 22).
      :ok = apply(:pg, :join, [scope, module, self()])
      {:pg, scope, module}
    else
      # OTP 22: :pg2, which pubsub 1.x uses too. By name as well: OTP 23
      # deprecates :pg2, and a call written out warns there, which
      # --warnings-as-errors refuses.
      group = {Drab.Presence.Cluster, module}
      :ok = apply(:pg2, :create, [group])
      :ok = apply(:pg2, :join, [group, self()])
      {:pg2, group}
    end
  end

  @doc "Whether peers are reached without Erlang distribution (so no nodedown comes)."
  @spec beyond_distribution?(t()) :: boolean()
  def beyond_distribution?(transport), do: match?({:pubsub, _, _}, transport)

  @doc "Sends `message` to every other member of the group."
  @spec broadcast(t(), term()) :: :ok
  def broadcast({:pubsub, server, topic}, message),
    do: Phoenix.PubSub.broadcast_from(server, self(), topic, message)

  def broadcast(nil, _message), do: :ok

  def broadcast(transport, message) do
    for pid <- members(transport), pid != self(), do: send(pid, message)
    :ok
  end

  @doc """
  Sends `message` to one peer, the process `pid` on `node`: straight to it
  where it is reachable, else (a PubSub adapter without distribution) to
  its node through PubSub. Without a pid and without PubSub, nothing is
  sent.
  """
  @spec send_to(t(), node(), pid() | nil, term()) :: term()
  def send_to({:pubsub, server, topic}, node, pid, message) do
    if is_pid(pid) and node(pid) in Node.list(),
      do: send(pid, message),
      else: Phoenix.PubSub.direct_broadcast(node, server, topic, message)
  end

  def send_to(_transport, _node, pid, message) when is_pid(pid), do: send(pid, message)
  def send_to(_transport, _node, nil, _message), do: :ok

  defp members({:pg, scope, group}), do: apply(:pg, :get_members, [scope, group])
  defp members({:pg2, group}), do: apply(:pg2, :get_members, [group])
end
