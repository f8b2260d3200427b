defmodule Drab.Presence.Key do
  @moduledoc false
  # Presence keys as the table stores and lists them, for both backends
  # (presence_core's key.rs is the Rust side of the same format).
  #
  # Keys are the terms users track, as in Phoenix (`42` and `"42"` are two
  # presences), listed, and their users counted, by to_string/1 (both under
  # "42"). A binary key is stored as itself, at no cost; any other key is
  # stored tagged with the string it lists under:
  #
  #     <<131, byte_size(listed)::32, listed::binary, term_to_binary(key)::binary>>
  #
  # No UTF-8 string starts with byte 131, so a binary that does is tagged
  # too, and never mistaken for a term.

  @tag 131

  @doc """
  The stored form of a user's key. Raises `ArgumentError` for a key that
  to_string/1 cannot convert, before anything is written.
  """
  @spec store!(term()) :: binary()
  def store!(<<@tag, _::binary>> = key), do: tagged(key, key)
  def store!(key) when is_binary(key), do: key
  def store!(key), do: tagged(listed!(key), key)

  @doc "The string a stored key is listed, and its user counted, under."
  @spec listed(binary()) :: binary()
  def listed(<<@tag, size::32, listed::binary-size(size), _term::binary>>), do: listed
  def listed(stored) when is_binary(stored), do: stored

  defp tagged(listed, key),
    do: <<@tag, byte_size(listed)::32, listed::binary, :erlang.term_to_binary(key)::binary>>

  defp listed!(key) do
    String.Chars.to_string(key)
  rescue
    exception ->
      reraise ArgumentError,
              [
                message:
                  "a presence key must be convertible to a string with to_string/1, got: " <>
                    "#{inspect(key)} (#{Exception.message(exception)})"
              ],
              __STACKTRACE__
  end
end
