defmodule Drab.Presence.Sidecar.Wire do
  @moduledoc false
  # The BEAM side of the sidecar protocol (native/presence_sidecar/src/
  # protocol.rs documents it): op and status codes, and local pids as the
  # u64 the sidecar keys owners and reply addresses by.

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

  @doc "The protocol version this library speaks."
  @spec version() :: pos_integer()
  def version, do: @version

  @doc "The byte of an op."
  @spec op(atom()) :: byte()
  def op(name), do: Map.fetch!(@ops, name)

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

  @doc "A byte string field: u32 length, then the bytes."
  @spec str(binary()) :: iodata()
  def str(bytes), do: [<<byte_size(bytes)::32>>, bytes]
end
