defmodule Drab.Presence.Cluster.Peers do
  @moduledoc false
  # What a cluster process knows of its peers, and the decisions it makes
  # on each event, as pure functions (as Phoenix.Tracker keeps State, Clock
  # and Replica pure around one Shard process). Every transition returns
  # the new state and the actions to carry out, in order; Drab.Presence.
  # Cluster carries them out (sends, backend calls, logs, telemetry) and
  # reports what a backend call answered when the next step depends on it
  # (`delta_applied/3`, `bad_delta/4`, `synced/3`).
  #
  # A peer is a replica: a node's presences in one incarnation of its table,
  # named `{node, incarnation}`. Its status:
  #
  #   * `:syncing`: its full state was asked for (at `requested_at`), or is
  #     on its way; its deltas wait;
  #   * `:live`: its state is in and deltas apply in order, `seq` the last;
  #   * `:down`: silent for `down_period`, or its node went down; its
  #     presences have left. It is synced anew if it speaks again, and
  #     forgotten `permdown_period` after `down_at`.
  #
  # Times are monotonic milliseconds, passed in by the caller.

  @enforce_keys [:me, :heartbeat_period, :down_period, :permdown_period, :last_heartbeat]
  defstruct @enforce_keys ++ [replicas: %{}]

  @type name :: {node(), incarnation :: binary()}
  @type replica_id :: non_neg_integer()

  @type replica :: %{
          id: replica_id(),
          status: :syncing | :live | :down,
          seq: non_neg_integer(),
          heard_at: integer(),
          requested_at: integer(),
          down_at: integer() | nil
        }

  @type t :: %__MODULE__{
          me: name(),
          heartbeat_period: pos_integer(),
          down_period: pos_integer(),
          permdown_period: pos_integer(),
          # {seq announced, when}
          last_heartbeat: {non_neg_integer() | nil, integer()},
          replicas: %{name() => replica()}
        }

  @typedoc "A message of this node to its peers (Cluster adds its pid and name)."
  @type outgoing :: :state_request | {:heartbeat, seq :: non_neg_integer()}

  @type action ::
          {:broadcast, outgoing()}
          | {:request_state, name(), pid() | nil}
          | {:send_state, name(), pid() | nil}
          | {:apply_delta, name(), replica_id(), seq :: pos_integer(), binary(), pid()}
          | {:sync_replica, name(), replica_id(), seq :: non_neg_integer(), [binary()]}
          | {:drop_replica, name(), replica_id(), why :: String.t()}
          | {:forget_replica, name(), replica_id()}
          | {:peer_up, name()}

  @typedoc "The replica id a new peer gets: they live with the table (Backend.replica_id/2)."
  @type ids :: (name() -> replica_id())

  @doc "No peers yet; `opts` holds the three periods (ms)."
  @spec new(name(), keyword(), integer()) :: t()
  def new(me, opts, now) do
    %__MODULE__{
      me: me,
      heartbeat_period: Keyword.fetch!(opts, :heartbeat_period),
      down_period: Keyword.fetch!(opts, :down_period),
      permdown_period: Keyword.fetch!(opts, :permdown_period),
      last_heartbeat: {nil, now}
    }
  end

  @doc "The peers, for tests and stats: `%{name => %{id, status, seq}}`."
  @spec replicas(t()) :: %{name() => map()}
  def replicas(%__MODULE__{replicas: replicas}),
    do: Map.new(replicas, fn {name, replica} -> {name, Map.take(replica, [:id, :status, :seq])} end)

  @doc """
  The peers a predecessor of this process knew (their ids are in the
  table): each is synced anew when it speaks (its presences stay, and only
  what changed meanwhile makes diffs), and dropped now if its node is not
  among `connected` (no nodedown will come); `:all` when the transport
  does not go through distribution.
  """
  @spec adopt(t(), [{name(), replica_id()}], MapSet.t(node()) | :all, integer()) ::
          {t(), [action()]}
  def adopt(peers, known, connected, now) do
    Enum.reduce(known, {peers, []}, fn {{node, _} = name, id}, {peers, actions} ->
      peers = put_new(peers, name, id, now)

      if connected == :all or MapSet.member?(connected, node),
        do: {peers, actions},
        else: down(peers, name, "its node was gone when this process started", now, actions)
    end)
  end

  ## Messages from peers

  @doc "A peer says hello: our state goes to it first, so that it knows us before it asks."
  @spec hello(t(), name(), pid(), integer(), ids()) :: {t(), [action()]}
  def hello(%__MODULE__{me: me} = peers, me, _from, _now, _ids), do: {peers, []}

  def hello(peers, name, from, now, ids),
    do: heard(peers, name, from, now, ids, [{:send_state, name, from}])

  @doc "A peer asks for our state."
  @spec state_request(t(), name(), pid(), integer(), ids()) :: {t(), [action()]}
  def state_request(peers, name, from, now, ids) do
    {peers, actions} = heard(peers, name, from, now, ids, [])
    {peers, actions ++ [{:send_state, name, from}]}
  end

  @doc """
  A peer's heartbeat, with the seq of its last delta: one later than what
  we applied means a delta was lost; a request unanswered for two periods
  is asked again (a peer restarting, a split).
  """
  @spec heartbeat(t(), name(), pid(), non_neg_integer(), integer(), ids()) :: {t(), [action()]}
  def heartbeat(peers, name, from, seq, now, ids) do
    {peers, actions} = heard(peers, name, from, now, ids, [])
    # Guards cannot read map fields before Elixir 1.11.
    %__MODULE__{heartbeat_period: heartbeat_period} = peers

    case peers.replicas[name] do
      %{status: :live, seq: applied} when seq > applied ->
        request_state(peers, name, from, now, actions)

      %{status: :syncing, requested_at: at} when now - at >= 2 * heartbeat_period ->
        request_state(peers, name, from, now, actions)

      _ ->
        {peers, actions}
    end
  end

  @doc """
  A peer's delta `seq`: the next one is applied (then `delta_applied/3` or
  `bad_delta/4`), an old one ignored, a gap makes us ask for its state.
  Deltas of a peer being synced wait for its state.
  """
  @spec delta(t(), name(), pid(), pos_integer(), binary(), integer(), ids()) :: {t(), [action()]}
  def delta(peers, name, from, seq, delta, now, ids) do
    {peers, actions} = heard(peers, name, from, now, ids, [])

    case peers.replicas[name] do
      %{status: :live, seq: applied, id: id} when seq == applied + 1 ->
        {peers, actions ++ [{:apply_delta, name, id, seq, delta, from}]}

      %{status: :live, seq: applied} when seq <= applied ->
        {peers, actions}

      %{status: :live} ->
        request_state(peers, name, from, now, actions)

      _syncing ->
        {peers, actions}
    end
  end

  @doc "The backend applied delta `seq` of `name`."
  @spec delta_applied(t(), name(), pos_integer()) :: t()
  def delta_applied(peers, name, seq), do: put_replica(peers, name, seq: seq)

  @doc "The backend refused a delta of `name` as malformed: its state is asked for."
  @spec bad_delta(t(), name(), pid() | nil, integer()) :: {t(), [action()]}
  def bad_delta(peers, name, from, now), do: request_state(peers, name, from, now, [])

  @doc """
  A peer's full state, sent to `to` (a direct broadcast reaches every
  incarnation on this node): applied when we were syncing it or it is not
  older than what we hold (then `synced/3`).
  """
  @spec state(t(), name(), name(), non_neg_integer(), [binary()], integer(), ids()) ::
          {t(), [action()]}
  def state(%__MODULE__{me: me} = peers, to, _name, _seq, _chunks, _now, _ids) when to != me,
    do: {peers, []}

  def state(peers, _to, name, seq, chunks, now, ids) do
    {peers, actions} = heard(peers, name, nil, now, ids, [], false)
    %{id: id, seq: applied, status: status} = peers.replicas[name]

    if status == :syncing or seq >= applied,
      do: {peers, actions ++ [{:sync_replica, name, id, seq, chunks}]},
      else: {peers, actions}
  end

  @doc "The backend took the state `seq` of `name`: it is live from there."
  @spec synced(t(), name(), non_neg_integer()) :: t()
  def synced(peers, name, seq), do: put_replica(peers, name, seq: seq, status: :live)

  @doc "A peer stopping on purpose: forgotten now."
  @spec goodbye(t(), name()) :: {t(), [action()]}
  def goodbye(peers, name) do
    if Map.has_key?(peers.replicas, name), do: forget(peers, name, []), else: {peers, []}
  end

  ## Events of this node

  @doc "`node` went down: its peers that are not down already go down."
  @spec nodedown(t(), node(), integer()) :: {t(), [action()]}
  def nodedown(peers, node, now) do
    downs = for {{^node, _} = name, %{status: status}} <- peers.replicas, status != :down, do: name

    Enum.reduce(downs, {peers, []}, fn name, {peers, actions} ->
      down(peers, name, "its node went down", now, actions)
    end)
  end

  @doc """
  This node's replicas of its peers are lost (a sidecar restarted): every
  peer not down is synced anew; its deltas wait until its state is in.
  """
  @spec replicas_lost(t(), integer()) :: {t(), [action()]}
  def replicas_lost(peers, now) do
    replicas =
      Map.new(peers.replicas, fn
        {name, %{status: :down} = replica} -> {name, replica}
        {name, replica} -> {name, %{replica | status: :syncing, requested_at: now}}
      end)

    {%{peers | replicas: replicas}, [{:broadcast, :state_request}]}
  end

  @doc """
  This node's heartbeat timer, with the seq of its last delta taken. A
  heartbeat goes out each period in which this node sent a delta, so that
  a lost last delta is noticed within a period; a quiet node only says it
  is alive, every third of down_period (Phoenix.Tracker is as quiet).
  Then peers silent too long go down, and those down too long are
  forgotten.
  """
  @spec tick(t(), non_neg_integer(), integer()) :: {t(), [action()]}
  def tick(peers, seq, now) do
    {last_seq, last_at} = peers.last_heartbeat

    {peers, actions} =
      if seq != last_seq or now - last_at >= quiet_period(peers),
        do: {%{peers | last_heartbeat: {seq, now}}, [{:broadcast, {:heartbeat, seq}}]},
        else: {peers, []}

    expire(peers, now, actions)
  end

  defp quiet_period(peers), do: max(peers.heartbeat_period, div(peers.down_period, 3))

  defp expire(peers, now, actions) do
    %__MODULE__{down_period: down_period, permdown_period: permdown_period} = peers

    Enum.reduce(peers.replicas, {peers, actions}, fn
      {name, %{status: :down, down_at: at}}, {acc, actions} when now - at >= permdown_period ->
        forget(acc, name, actions)

      {name, %{status: status, heard_at: at}}, {acc, actions}
      when status != :down and now - at >= down_period ->
        down(acc, name, "it was silent for #{down_period} ms", now, actions)

      _, acc ->
        acc
    end)
  end

  ## Transitions

  # Notes that `name` spoke. A peer not known yet (or down, or from a new
  # incarnation of a known node) is synced from scratch, unless what it
  # said is its state (`request?` false).
  defp heard(peers, {node, _} = name, from, now, ids, actions, request? \\ true) do
    case peers.replicas do
      %{^name => %{status: :down}} ->
        peers = put_replica(peers, name, heard_at: now, down_at: nil, status: :syncing)
        actions = actions ++ [{:peer_up, name}]
        if request?, do: request_state(peers, name, from, now, actions), else: {peers, actions}

      %{^name => _} ->
        {put_replica(peers, name, heard_at: now), actions}

      %{} ->
        actions = actions ++ [{:peer_up, name}]
        stale = for {{^node, _} = other, _} <- peers.replicas, other != name, do: other
        {peers, actions} = Enum.reduce(stale, {peers, actions}, fn n, {p, a} -> forget(p, n, a) end)
        peers = put_new(peers, name, ids.(name), now)
        if request?, do: request_state(peers, name, from, now, actions), else: {peers, actions}
    end
  end

  defp put_new(peers, name, id, now) do
    replica = %{id: id, status: :syncing, seq: 0, heard_at: now, requested_at: now, down_at: nil}
    %{peers | replicas: Map.put(peers.replicas, name, replica)}
  end

  defp request_state(peers, name, from, now, actions) do
    peers = put_replica(peers, name, status: :syncing, requested_at: now)
    {peers, actions ++ [{:request_state, name, from}]}
  end

  # Its presences leave now; it is remembered, down, until it speaks again
  # (then it is synced anew) or permdown_period passes.
  defp down(peers, name, why, now, actions) do
    %{id: id} = peers.replicas[name]
    peers = put_replica(peers, name, status: :down, down_at: now, seq: 0)
    {peers, actions ++ [{:drop_replica, name, id, why}]}
  end

  defp forget(peers, name, actions) do
    %{id: id} = peers.replicas[name]
    peers = %{peers | replicas: Map.delete(peers.replicas, name)}
    {peers, actions ++ [{:forget_replica, name, id}]}
  end

  defp put_replica(peers, name, changes) do
    %{peers | replicas: Map.update!(peers.replicas, name, &Map.merge(&1, Map.new(changes)))}
  end
end
