defmodule Drab.Presence.Sidecar.Wire do
  @moduledoc false
  # The BEAM side of the sidecar protocol (native/presence_sidecar/src/
  # protocol/ documents it): the op and status codes, the frames of
  # requests and writes, the head of replies, and local pids as the u64 the
  # sidecar keys owners and reply addresses by. No other module of this
  # side writes an op or status byte: they name them, `Wire.op(:track)`,
  # `Wire.status(:ok)` (macros, so that they serve in patterns too).
  #
  # A frame (each one is a port packet, length-prefixed by the port):
  #
  #     request: <<op, request_id::64, reply_to::64, body::binary>>
  #     reply:   <<op, request_id::64, reply_to::64, status, body::binary>>
  #
  # Writes (track, untrack, update, exit) carry no id and no reply address
  # (both 0) and get no reply; a Wake frame is a reply with neither.

  # 2: cluster mode (replication ops 40..47, status 9 bad_delta, a
  # delta_started byte in take_diffs replies, replicas in stats).
  # 3: writes decided on the BEAM side, with their refs, and not answered;
  # Wake frames; delivered leaves in take_diffs and ack_part replies.
  # 4: each next_part part carries its age (microseconds since its oldest
  # change), for the diff latency in telemetry.
  @version 4

  @ops %{
    hello: 1,
    configure: 2,
    set_dispatcher: 3,
    wake: 4,
    track: 16,
    untrack: 17,
    update: 19,
    exit: 20,
    counts: 21,
    list: 22,
    get_by_key: 23,
    take_diffs: 24,
    next_part: 25,
    ack_part: 26,
    stats: 27,
    replay: 32,
    recovery_leaves: 33,
    set_replicator: 40,
    delta_seq: 41,
    take_delta: 42,
    local_state: 43,
    apply_delta: 44,
    sync_replica: 45,
    drop_replica: 46,
    forget_replica: 47
  }

  @statuses %{
    ok: 0,
    already_tracked: 1,
    not_tracked: 2,
    noproc: 3,
    stale: 4,
    meta_too_large: 5,
    # A frame the sidecar could not read: op and ids may be zero.
    bad_frame: 6,
    # One chunk of a reply that continues in the next frame.
    more: 7,
    # A hello or configure it will not take; it exits after.
    refused: 8,
    bad_delta: 9
  }

  # Bits of the flags byte of a replication write's reply.
  @wake_flag 2

  @doc "The protocol version this library speaks."
  @spec version() :: pos_integer()
  def version, do: @version

  @doc """
  The byte of an op: a literal when `name` is one (so that it serves in
  patterns and guards), else looked up when the code runs.
  """
  defmacro op(name) when is_atom(name), do: Map.fetch!(@ops, name)
  defmacro op(name), do: quote(do: Drab.Presence.Sidecar.Wire.op_byte(unquote(name)))

  @doc "The byte of a status, a literal (for patterns and guards)."
  defmacro status(name) when is_atom(name), do: Map.fetch!(@statuses, name)

  @doc "The byte of the op named `name`."
  @spec op_byte(atom()) :: byte()
  # One clause per op: every write builds its frame with this.
  for {name, byte} <- @ops, do: def(op_byte(unquote(name)), do: unquote(byte))

  @doc "The name of a status byte; an unknown one stays a byte."
  @spec status_name(byte()) :: atom() | byte()
  for {name, byte} <- @statuses, do: def(status_name(unquote(byte)), do: unquote(name))
  def status_name(byte), do: byte

  @doc "Whether a replication write's reply flags say a diff became pending."
  @spec wake?(byte()) :: boolean()
  def wake?(flags), do: Bitwise.band(flags, @wake_flag) != 0

  @doc "A request frame: `reply_to` is the `pid_id/1` its reply goes to (0: the port owner)."
  @spec request(atom(), non_neg_integer(), non_neg_integer(), iodata()) :: iodata()
  def request(name, id, reply_to, body),
    do: [<<op_byte(name), id::64, reply_to::64>> | List.wrap(body)]

  ## Writes (protocol 3): no request id, no reply address, no reply.

  @doc "The frame of a track of `owner`'s presence under `key` on `topic`."
  @spec track_frame(non_neg_integer(), binary(), binary(), non_neg_integer(), binary()) :: iodata()
  def track_frame(owner, topic, key, ref, meta),
    do: [write_head(:track, owner, topic, key), <<ref::64>>, meta]

  @doc "The frame of an untrack of the presence that had `ref`."
  @spec untrack_frame(non_neg_integer(), binary(), binary(), non_neg_integer()) :: iodata()
  def untrack_frame(owner, topic, key, ref),
    do: [write_head(:untrack, owner, topic, key), <<ref::64>>]

  @doc "The frame of an update: the presence that had `old_ref` has `ref` and `meta` now."
  @spec update_frame(
          non_neg_integer(),
          binary(),
          binary(),
          non_neg_integer(),
          non_neg_integer(),
          binary()
        ) ::
          iodata()
  def update_frame(owner, topic, key, old_ref, ref, meta),
    do: [write_head(:update, owner, topic, key), <<old_ref::64, ref::64>>, meta]

  @doc "The frame of owners gone, each with the refs its journal held."
  @spec exit_frame([{non_neg_integer(), [non_neg_integer()]}]) :: iodata()
  def exit_frame(departed) do
    [
      <<op_byte(:exit), 0::64, 0::64, length(departed)::32>>
      | for(
          {owner, refs} <- departed,
          do: [<<owner::64, length(refs)::32>> | for(r <- refs, do: <<r::64>>)]
        )
    ]
  end

  defp write_head(name, owner, topic, key),
    do: [<<op_byte(name), 0::64, 0::64, owner::64>>, str(topic), str(key)]

  @doc """
  A local pid as a u64, `serial <<< 32 ||| number`: unique among live local
  processes and ordered as the pids are, so metas of one key list in the
  same (owner) order as with the NIF.
  """
  @spec pid_id(pid()) :: non_neg_integer()
  def pid_id(pid) do
    <<131, tag, rest::binary>> = :erlang.term_to_binary(pid)
    true = tag in [88, 103]
    <<number::32, serial::32, _creation::binary>> = skip_atom(rest)
    Bitwise.bor(Bitwise.bsl(serial, 32), number)
  end

  @doc "What `id_pid/2` needs to turn ids back into pids on this node."
  @spec pid_template() :: {binary(), binary()}
  def pid_template do
    <<131, tag, rest::binary>> = bin = :erlang.term_to_binary(self())
    <<_number::32, _serial::32, creation::binary>> = after_atom = skip_atom(rest)
    prefix = binary_part(bin, 0, byte_size(bin) - byte_size(after_atom))
    true = tag in [88, 103]
    {prefix, creation}
  end

  @doc """
  `state` (a map with `:template` and `:template_node`) with a template for
  this node as it is named now: a VM made distributed after a table started
  (`Node.start/2`, or the multi-node tests) renames its pids, and a stale
  template makes pids of a node that does not exist, so replies go nowhere.
  """
  @spec fresh_template(map()) :: map()
  def fresh_template(%{template_node: node} = state) when node == node(), do: state

  def fresh_template(state),
    do: Map.merge(state, %{template: pid_template(), template_node: node()})

  @doc "The local pid of an id from `pid_id/1`."
  @spec id_pid({binary(), binary()}, non_neg_integer()) :: pid()
  def id_pid({prefix, creation}, id) do
    number = Bitwise.band(id, 0xFFFFFFFF)
    serial = Bitwise.bsr(id, 32)
    :erlang.binary_to_term(<<prefix::binary, number::32, serial::32, creation::binary>>)
  end

  defp skip_atom(<<t, len::16, _::binary-size(len), rest::binary>>) when t in [100, 118], do: rest
  defp skip_atom(<<t, len, _::binary-size(len), rest::binary>>) when t in [115, 119], do: rest

  @doc "A phx_ref as the NIF renders it: the ref's 8 bytes in url-safe base64."
  @spec ref_string(non_neg_integer()) :: binary()
  def ref_string(ref), do: Base.url_encode64(<<ref::64>>, padding: false)

  @doc "The body of a `configure` request: the meta limit, one diff per operation or not."
  @spec configure_body({pos_integer(), boolean()}) :: binary()
  def configure_body({max_meta_bytes, diff_per_operation?}),
    do: <<max_meta_bytes::64, if(diff_per_operation?, do: 1, else: 0)::8>>

  @doc "A byte string field: u32 length, then the bytes."
  @spec str(binary()) :: iodata()
  def str(bytes), do: [<<byte_size(bytes)::32>>, bytes]
end
