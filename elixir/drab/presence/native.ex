defmodule Drab.Presence.Native do
  @moduledoc false
  # The NIF stubs. Every function is replaced by native/presence_nif when the
  # library loads; the bodies only run if it did not.
  #
  # `config :drab_presence, nif: false` (read at compile time) is for teams
  # that allow no NIF: the library is then neither built nor installed
  # (Mix.Tasks.Compile.PresenceNif), this module has no @on_load, and
  # nothing loads it, not even a release that preloads every module.

  @enabled Application.compile_env(:drab_presence, :nif, true) != false

  if @enabled, do: @on_load(:load_nif)

  @doc "Whether this build has the NIF (`config :drab_presence, nif: false` leaves it out)."
  @spec enabled?() :: boolean()
  def enabled?, do: @enabled

  @typedoc "A presence table (a NIF resource)."
  @opaque table :: reference()

  @typedoc "Every reason a table NIF returns in `{:error, reason}`."
  @type reason :: :already_tracked | :not_tracked | :noproc | :stale | :meta_too_large

  @loaded {__MODULE__, :loaded}

  @doc false
  # Loads the NIF once per VM. A reload (a hot upgrade, `:code.load_file/1`,
  # or `:code.delete/1` and `:code.purge/1` first) is refused: rustler
  # registers no upgrade callback, and a second library instance would make
  # its own resource types, leaving every running table unreachable. With
  # the old code still current, it keeps running; new native code needs a
  # VM restart.
  @spec load_nif() :: :ok | {:error, term()}
  def load_nif do
    if :persistent_term.get(@loaded, false) do
      :logger.error(
        "Drab.Presence.Native was already loaded in this VM; reloading its NIF library " <>
          "is not supported (running presence tables would become unreachable). " <>
          "Restart the VM to load new native code."
      )

      {:error, :reload_not_supported}
    else
      path = :filename.join(:code.priv_dir(:drab_presence), ~c"native/libpresence_nif")

      with :ok <- :erlang.load_nif(path, 0) do
        :persistent_term.put(@loaded, true)
      end
    end
  end

  @spec table_new(pos_integer()) :: table()
  def table_new(_max_meta_bytes), do: err()

  @spec table_set_dispatcher(table(), pid()) :: boolean()
  def table_set_dispatcher(_table, _pid), do: err()

  @spec table_track(table(), pid(), binary(), binary(), map()) ::
          {:ok, binary()} | {:error, reason()} | :busy
  def table_track(_table, _pid, _topic, _key, _meta), do: err()

  @spec table_untrack(table(), pid(), binary(), binary()) :: :ok | :busy
  def table_untrack(_table, _pid, _topic, _key), do: err()

  @spec table_lookup(table(), pid(), binary(), binary()) ::
          {:ok, {map(), non_neg_integer()}} | {:error, :not_tracked} | :busy
  def table_lookup(_table, _pid, _topic, _key), do: err()

  @spec table_update(table(), pid(), binary(), binary(), map(), non_neg_integer() | nil) ::
          {:ok, binary()} | {:error, reason()} | :busy
  def table_update(_table, _pid, _topic, _key, _meta, _expected_ref), do: err()

  @spec table_counts(table(), binary()) :: {non_neg_integer(), non_neg_integer()} | :busy
  def table_counts(_table, _topic), do: err()

  @spec table_list(table(), binary()) :: map() | :too_large | :busy
  def table_list(_table, _topic), do: err()

  @spec table_list_dirty(table(), binary()) :: map()
  def table_list_dirty(_table, _topic), do: err()

  @spec table_get_by_key(table(), binary(), binary()) :: map() | [] | :too_large | :busy
  def table_get_by_key(_table, _topic, _key), do: err()

  @spec table_get_by_key_dirty(table(), binary(), binary()) :: map() | []
  def table_get_by_key_dirty(_table, _topic, _key), do: err()

  @spec table_configure(table(), pos_integer()) :: :ok
  def table_configure(_table, _max_meta_bytes), do: err()

  @spec table_set_diff_per_operation(table(), boolean()) :: :ok
  def table_set_diff_per_operation(_table, _diff_per_operation), do: err()

  @spec table_take_diffs(table(), pos_integer()) ::
          {queued_parts :: non_neg_integer(), still_pending :: non_neg_integer()}
          | :too_large
          | :busy
  def table_take_diffs(_table, _max_topics), do: err()

  @spec table_take_diffs_dirty(table(), pos_integer()) ::
          {queued_parts :: non_neg_integer(), still_pending :: non_neg_integer()}
  def table_take_diffs_dirty(_table, _max_topics), do: err()

  @spec table_next_part(table()) ::
          {non_neg_integer(), binary(), map(), map(), non_neg_integer()}
          | :none
          | :too_large
          | :busy
  def table_next_part(_table), do: err()

  @spec table_next_part_dirty(table()) ::
          {non_neg_integer(), binary(), map(), map(), non_neg_integer()} | :none
  def table_next_part_dirty(_table), do: err()

  @spec table_ack_part(table(), non_neg_integer()) :: :ok
  def table_ack_part(_table, _id), do: err()

  @spec table_stats(table()) :: %{atom() => non_neg_integer()}
  def table_stats(_table), do: err()

  @spec replication_set_replicator(table(), pid() | nil) :: incarnation :: binary()
  def replication_set_replicator(_table, _pid), do: err()

  @spec replication_delta_seq(table()) :: non_neg_integer() | :busy
  def replication_delta_seq(_table), do: err()

  @spec replication_take_delta(table()) :: {pos_integer(), binary()} | :none | :busy
  def replication_take_delta(_table), do: err()

  @spec replication_local_state(table()) :: {non_neg_integer(), [binary()]}
  def replication_local_state(_table), do: err()

  @spec replication_apply_delta(table(), non_neg_integer(), binary()) ::
          :ok | :too_large | {:error, :bad_delta} | :busy
  def replication_apply_delta(_table, _replica, _delta), do: err()

  @spec replication_apply_delta_dirty(table(), non_neg_integer(), binary()) ::
          :ok | {:error, :bad_delta}
  def replication_apply_delta_dirty(_table, _replica, _delta), do: err()

  @spec replication_sync_replica(table(), non_neg_integer(), [binary()]) ::
          :ok | {:error, :bad_delta}
  def replication_sync_replica(_table, _replica, _chunks), do: err()

  @spec replication_drop_replica(table(), non_neg_integer()) :: non_neg_integer()
  def replication_drop_replica(_table, _replica), do: err()

  @spec replication_replica_id(table(), binary()) :: pos_integer()
  def replication_replica_id(_table, _name), do: err()

  @spec replication_replica_ids(table()) :: [{binary(), pos_integer()}]
  def replication_replica_ids(_table), do: err()

  @spec replication_forget_replica(table(), non_neg_integer()) :: non_neg_integer()
  def replication_forget_replica(_table, _replica), do: err()

  @spec replication_replica_len(table(), non_neg_integer()) :: non_neg_integer()
  def replication_replica_len(_table, _replica), do: err()

  @spec test_panic() :: no_return()
  def test_panic, do: err()

  @spec test_take_longest_exit_hold_us() :: non_neg_integer()
  def test_take_longest_exit_hold_us, do: err()

  defp err, do: :erlang.nif_error(:nif_not_loaded)
end
