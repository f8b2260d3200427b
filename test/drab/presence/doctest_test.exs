defmodule Drab.Presence.DoctestTest do
  use ExUnit.Case, async: true
  doctest Drab.Presence
end
