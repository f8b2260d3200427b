defmodule Drab.Presence.Sidecar.Table do
  @moduledoc false
  # A presence table that lives in a sidecar, as this VM holds it: what
  # `Backend.Sidecar.new/2` returns and every caller passes back (the NIF's
  # counterpart is its table resource). It names the BEAM-side state (ETS
  # tables), the processes that serve the table (`monitors`, `port_owner`)
  # and the settings, and finds the current port (`current/1`).
  #
  # Local writes are decided on this side, by their callers, each under a
  # lock on its owner (see Writes), before the sidecar hears of them. An
  # owner is a tracked process, as the u64 Wire.pid_id/1 makes of it. The
  # ETS tables:
  #
  #   * journal: `{{owner, topic, key}, ref, meta, prev_ref | nil}`, every
  #     local presence (ordered_set: an owner's presences are one range);
  #     replayed into a restarted sidecar;
  #   * leaves: `{ref, topic, key, meta}`, presences removed whose leaves
  #     the sidecar has not yet said are delivered; they are owed again
  #     after a restart;
  #   * counts: `{topic, users, connections}` and `{{topic, listed_key}, n}`,
  #     so that counting reads ETS (O(1)) instead of crossing the port;
  #     replicated presences (cluster mode) count too, written by the port
  #     owner from the sidecar's replies (see Journal);
  #   * locks: `{owner, writer}`, held during each write of the owner's;
  #   * replication (cluster mode): `{:incarnation, uuid}` (made with the
  #     table: its replica name on other nodes), `{:replicator, pid | nil}`,
  #     `{:seq, n}` (the last delta handed out), replica ids by name
  #     (`{{:id, name}, id}`, `{:last_id, n}`), and `{{:remote, topic,
  #     key}, n}`, the replicated presences counted, to uncount when a
  #     sidecar dies with them. All of it outlives a sidecar: a restarted
  #     one keeps this node's name and numbering (see Recovery). The same
  #     ETS table keeps `{:dispatcher, pid | nil}`, for a port owner that
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
    :settings,
    :monitors,
    :port_owner,
    :path
  ]
  defstruct @enforce_keys

  # The indexes of `settings`, read by callers and by the port owner when
  # it configures a new sidecar. diff_per_operation: 1 for `diff_window: 0`.
  @max_meta_bytes 1
  @diff_per_operation 2

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
          settings: :atomics.atomics_ref(),
          monitors: tuple(),
          port_owner: atom(),
          path: Path.t()
        }

  @doc """
  A new table of presence module `module` (named in telemetry events), to
  `configure/3` before its sidecar starts; `create_tables/1` makes its ETS
  tables.
  """
  @spec new(module(), pos_integer(), Path.t()) :: t()
  def new(module, pool_size, path) do
    id = :erlang.unique_integer([:positive])
    name = fn suffix -> :"drab_presence_sidecar_#{id}_#{suffix}" end
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
      settings: :atomics.new(2, signed: false),
      monitors: List.to_tuple(for i <- 1..pool_size, do: name.("monitor#{i}")),
      port_owner: name.(:port_owner),
      path: path
    }
  end

  @doc """
  Sets the options that may change while the table lives: the meta limit,
  and whether each operation makes its own diff (`diff_window: 0`). The
  sidecar is told by the caller; a restarted one, by the port owner.
  """
  @spec configure(t(), pos_integer(), boolean()) :: :ok
  def configure(%__MODULE__{settings: settings}, max_meta_bytes, diff_per_operation?) do
    :atomics.put(settings, @max_meta_bytes, max_meta_bytes)
    :atomics.put(settings, @diff_per_operation, if(diff_per_operation?, do: 1, else: 0))
    :ok
  end

  @doc "`{max_meta_bytes, diff_per_operation?}` as last configured."
  @spec settings(t()) :: {pos_integer(), boolean()}
  def settings(%__MODULE__{settings: settings}) do
    {:atomics.get(settings, @max_meta_bytes), :atomics.get(settings, @diff_per_operation) == 1}
  end

  @doc "The meta limit, as the caller of a write checks it."
  @spec max_meta_bytes(t()) :: pos_integer()
  def max_meta_bytes(%__MODULE__{settings: settings}), do: :atomics.get(settings, @max_meta_bytes)

  @doc false
  @spec create_tables(t()) :: :ok
  def create_tables(%__MODULE__{} = table) do
    :ets.new(table.journal, [:ordered_set, :public, :named_table, write_concurrency: true])
    :ets.new(table.leaves, [:set, :public, :named_table, write_concurrency: true])

    :ets.new(table.counts, [
      :set,
      :public,
      :named_table,
      read_concurrency: true,
      write_concurrency: true
    ])

    :ets.new(table.locks, [:set, :public, :named_table, write_concurrency: true])
    :ets.new(table.replication, [:set, :public, :named_table])

    :ets.insert(table.replication, [
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
