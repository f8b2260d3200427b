defmodule Drab.Presence.Sidecar.Handle do
  @moduledoc false
  # What callers of a sidecar table hold: the names of its ETS tables and
  # processes, the meta limit, and where to find the current port.
  #
  # The BEAM-side state. Local writes are decided here, by their callers,
  # each under a lock on its owner (see Writes), before the sidecar hears
  # of them:
  #
  #   * journal: `{{owner, topic, key}, ref, meta, prev_ref | nil}`, every
  #     local presence (ordered_set: an owner's presences are one range);
  #     replayed into a restarted sidecar;
  #   * leaves: `{ref, topic, key, meta}`, presences removed whose leaves
  #     the sidecar has not yet said are delivered; they are owed again
  #     after a restart;
  #   * counts: `{topic, users, connections}` and `{{topic, key}, n}`, so
  #     that counting reads ETS (O(1)) instead of crossing the port;
  #     replicated presences (cluster mode) count too, written by the port
  #     owner from the sidecar's replies;
  #   * locks: `{owner, writer}`, held during each write of the owner's;
  #   * replication (cluster mode): `{:incarnation, uuid}` (made with the
  #     handle: this table's replica name on other nodes), `{:replicator,
  #     pid | nil}`, `{:seq, n}` (the last delta handed out), replica ids by
  #     name (`{{:id, name}, id}`, `{:last_id, n}`), and `{{:remote, topic,
  #     key}, n}`, the replicated presences counted, to uncount when a
  #     sidecar dies with them. All of it outlives a sidecar: a restarted
  #     one keeps this node's name and numbering (see PortOwner). The same
  #     table keeps `{:dispatcher, pid | nil}`, for a port owner that
  #     replaces a crashed one.

  @enforce_keys [
    :id,
    :module,
    :journal,
    :leaves,
    :counts,
    :locks,
    :ref_seed,
    :refs,
    :replication,
    :max_meta,
    :monitors,
    :owner,
    :path
  ]
  defstruct @enforce_keys

  @type t :: %__MODULE__{
          id: pos_integer(),
          module: module(),
          journal: atom(),
          leaves: atom(),
          counts: atom(),
          locks: atom(),
          ref_seed: non_neg_integer(),
          refs: :atomics.atomics_ref(),
          replication: atom(),
          max_meta: :atomics.atomics_ref(),
          monitors: tuple(),
          owner: atom(),
          path: Path.t()
        }

  @doc """
  A handle for a new table of presence module `module` (named in telemetry
  events); `create_tables/1` makes its tables.
  """
  @spec new(module(), pos_integer(), pos_integer(), Path.t()) :: t()
  def new(module, max_meta_bytes, pool_size, path) do
    id = :erlang.unique_integer([:positive])
    name = fn suffix -> :"drab_presence_sidecar_#{id}_#{suffix}" end
    # 1: max_meta_bytes; 2: 1 for `diff_window: 0` (one diff per operation).
    max_meta = :atomics.new(2, signed: false)
    :atomics.put(max_meta, 1, max_meta_bytes)
    # Refs handed out are counted from a random seed, so that refs differ
    # between tables and nodes (see Writes.new_ref/1).
    <<ref_seed::64>> = random_bytes(8)

    %__MODULE__{
      id: id,
      module: module,
      journal: name.(:journal),
      leaves: name.(:leaves),
      counts: name.(:counts),
      locks: name.(:locks),
      ref_seed: ref_seed,
      refs: :atomics.new(1, signed: false),
      replication: name.(:replication),
      max_meta: max_meta,
      monitors: List.to_tuple(for i <- 1..pool_size, do: name.("monitor#{i}")),
      owner: name.(:port_owner),
      path: path
    }
  end

  @doc false
  @spec create_tables(t()) :: :ok
  def create_tables(%__MODULE__{} = h) do
    :ets.new(h.journal, [:ordered_set, :public, :named_table, write_concurrency: true])
    :ets.new(h.leaves, [:set, :public, :named_table, write_concurrency: true])

    :ets.new(h.counts, [
      :set,
      :public,
      :named_table,
      read_concurrency: true,
      write_concurrency: true
    ])

    :ets.new(h.locks, [:set, :public, :named_table, write_concurrency: true])
    :ets.new(h.replication, [:set, :public, :named_table])

    :ets.insert(h.replication, [
      {:incarnation, uuid()},
      {:replicator, nil},
      {:seq, 0},
      {:dispatcher, nil}
    ])

    :ok
  end

  # A random (v4) UUID, as the NIF names its tables (:rand is seeded from
  # the node, the pid and the time; :crypto is not among our applications).
  defp uuid do
    <<a::48, _::4, b::12, _::2, c::62>> = random_bytes(16)
    hex = Base.encode16(<<a::48, 4::4, b::12, 2::2, c::62>>, case: :lower)
    <<p1::binary-8, p2::binary-4, p3::binary-4, p4::binary-4, p5::binary-12>> = hex
    Enum.join([p1, p2, p3, p4, p5], "-")
  end

  defp random_bytes(n), do: for(_ <- 1..n, into: <<>>, do: <<:rand.uniform(256) - 1>>)

  @doc "The monitor process in charge of `owner`."
  @spec monitor_for(t(), non_neg_integer()) :: atom()
  def monitor_for(%__MODULE__{monitors: monitors}, owner),
    do: elem(monitors, :erlang.phash2(owner, tuple_size(monitors)))

  @doc "`{epoch, port}` of the running sidecar, `{epoch, nil}` while it restarts."
  @spec current(t()) :: {non_neg_integer(), port() | nil}
  def current(%__MODULE__{id: id}), do: :persistent_term.get({__MODULE__, id}, {0, nil})

  @doc false
  @spec publish(t(), non_neg_integer(), port() | nil) :: :ok
  def publish(%__MODULE__{id: id}, epoch, port),
    do: :persistent_term.put({__MODULE__, id}, {epoch, port})

  @doc false
  @spec unpublish(t()) :: boolean()
  def unpublish(%__MODULE__{id: id}), do: :persistent_term.erase({__MODULE__, id})
end
