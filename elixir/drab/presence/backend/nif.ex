defmodule Drab.Presence.Backend.NIF do
  @moduledoc false
  # The table in this VM, behind Drab.Presence.Native.
  @behaviour Drab.Presence.Backend

  alias Drab.Presence.Native

  @impl true
  def new(opts), do: Native.table_new(Keyword.fetch!(opts, :max_meta_bytes))

  @impl true
  defdelegate set_dispatcher(table, pid), to: Native, as: :table_set_dispatcher

  @impl true
  defdelegate track(table, pid, topic, key, meta), to: Native, as: :table_track

  @impl true
  defdelegate untrack(table, pid, topic, key), to: Native, as: :table_untrack

  @impl true
  defdelegate lookup(table, pid, topic, key), to: Native, as: :table_lookup

  @impl true
  defdelegate update(table, pid, topic, key, meta, expected_ref), to: Native, as: :table_update

  @impl true
  defdelegate counts(table, topic), to: Native, as: :table_counts

  # Small topics are listed on the calling scheduler; the NIF answers
  # :too_large when a topic is big enough to belong on a dirty scheduler.
  @impl true
  def list(table, topic) do
    case Native.table_list(table, topic) do
      :too_large -> Native.table_list_dirty(table, topic)
      presences -> presences
    end
  end

  @impl true
  defdelegate get_by_key(table, topic, key), to: Native, as: :table_get_by_key

  # The parts of taken diffs are decoded one at a time, as the dispatcher
  # walks the stream, so it never holds a 100k-presence diff at once.
  @impl true
  def take_diffs(table, max_topics) do
    {queue, still_pending} = Native.table_take_diffs(table, max_topics)

    parts =
      Stream.repeatedly(fn -> Native.diff_queue_next(queue) end)
      |> Stream.take_while(&(&1 != :done))

    {parts, still_pending}
  end

  @impl true
  defdelegate stats(table), to: Native, as: :table_stats
end
